//! Adam (Kingma & Ba 2015) over tch tensors, with PyTorch's defaults and update rule, written out
//! because tch does not expose the state of libtorch's C++ optimisers: here the moments and the
//! step count are named tensors, saved beside the weights, so a resumed run goes on with the
//! optimiser where it was instead of restarting Adam's estimates from zero.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use tch::{nn, Kind, Tensor};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The prefix of the optimiser's tensors among a checkpoint's: `optim.step`, `optim.m.NAME`,
/// `optim.v.NAME` for each trainable variable NAME.
pub const PREFIX: &str = "optim.";

pub struct Adam {
    /// The trainable variables by name, in name order.
    params: Vec<(String, Tensor)>,
    /// First and second moment estimates, one per parameter.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i64,
}

impl Adam {
    pub fn new(vs: &nn::VarStore) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros =
            |params: &[(String, Tensor)]| params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            m: zeros(&params),
            v: zeros(&params),
            params,
            step: 0,
        }
    }

    /// d loss / d parameter for each parameter, in `step`'s order, as new tensors (undefined for
    /// a parameter the loss does not reach). Unlike `backward`, nothing is accumulated into the
    /// parameters' `.grad`, so there is nothing to zero before the next step: two passes over
    /// every weight saved per step.
    pub fn gradients(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
        Ok(Tensor::f_run_backward(&[loss], &params, false, false)?)
    }

    /// Steps taken (the bias corrections' t).
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// Forgets the moments and the step count, as a new optimiser would have them.
    pub fn reset(&mut self) {
        tch::no_grad(|| {
            for t in self.m.iter_mut().chain(self.v.iter_mut()) {
                let _ = t.zero_();
            }
        });
        self.step = 0;
    }

    /// One update at learning rate `lr` from `grads` (`gradients`' order):
    /// m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
    /// p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), as torch.optim.Adam.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let step_size = lr / (1.0 - BETA1.powf(t));
        let bc2_sqrt = (1.0 - BETA2.powf(t)).sqrt();
        tch::no_grad(|| {
            let params = self.params.iter_mut().zip(&mut self.m).zip(&mut self.v);
            for ((((_, p), m), v), g) in params.zip(grads) {
                if !g.defined() {
                    continue;
                }
                let _ = m.lerp_(g, 1.0 - BETA1);
                let _ = v.lerp_(&g.square(), 1.0 - BETA2);
                // The same update with the bias correction moved out of the denominator, one
                // pass over the weights fewer: step_size * m / (sqrt(v) / bc2 + eps)
                // = step_size * bc2 * m / (sqrt(v) + eps * bc2); then p + m / (denom / -s).
                let mut denom = v.sqrt();
                let _ = denom.g_add_scalar_(EPS * bc2_sqrt);
                let _ = denom.g_div_scalar_(-step_size * bc2_sqrt);
                let _ = p.addcdiv_(m, &denom);
            }
        });
    }

    /// The state as named tensors (on the CPU), for a checkpoint.
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
        let mut out = vec![(format!("{PREFIX}step"), Tensor::from_slice(&[self.step]))];
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            out.push((format!("{PREFIX}m.{name}"), cpu(m)));
            out.push((format!("{PREFIX}v.{name}"), cpu(v)));
        }
        out
    }

    /// Restores the state `named_state` gave from a checkpoint's tensors. False when they hold
    /// none (a checkpoint written before the optimiser was saved): the moments stay at zero.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<bool> {
        let Some(step) = tensors.get(&format!("{PREFIX}step")) else {
            return Ok(false);
        };
        let step = step.int64_value(&[0]);
        tch::no_grad(|| -> Result<()> {
            for (((name, p), m), v) in self.params.iter().zip(&mut self.m).zip(&mut self.v) {
                for (which, dst) in [("m", m), ("v", v)] {
                    let key = format!("{PREFIX}{which}.{name}");
                    let src = tensors.get(&key);
                    ensure!(
                        src.is_some_and(|s| s.size() == p.size()),
                        "the optimiser state has no {key} of shape {:?}",
                        p.size()
                    );
                    if let Some(src) = src {
                        dst.copy_(&src.to_kind(Kind::Float));
                    }
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::Device;

    /// A small regression trained by this Adam and by libtorch's for ten steps at once.
    fn two_models() -> (nn::VarStore, nn::Linear, nn::VarStore, nn::Linear) {
        let a = nn::VarStore::new(Device::Cpu);
        let la = nn::linear(a.root() / "l", 5, 3, Default::default());
        let mut b = nn::VarStore::new(Device::Cpu);
        let lb = nn::linear(b.root() / "l", 5, 3, Default::default());
        b.copy(&a).unwrap();
        (a, la, b, lb)
    }

    #[test]
    fn adam_follows_libtorch_adam() {
        let _rng = crate::seeded(11);
        let (a, la, b, lb) = two_models();
        let x = Tensor::randn([16, 5], (Kind::Float, Device::Cpu));
        let y = Tensor::randn([16, 3], (Kind::Float, Device::Cpu));
        let mut ours = Adam::new(&a);
        let mut theirs = nn::Adam::default().build(&b, 0.01).unwrap();
        for _ in 0..10 {
            let grads = ours
                .gradients(&(la.forward(&x) - &y).square().mean(Kind::Float))
                .unwrap();
            ours.step(&grads, 0.01);
            theirs.zero_grad();
            (lb.forward(&x) - &y).square().mean(Kind::Float).backward();
            theirs.step();
        }
        assert_eq!(ours.steps(), 10);
        for (name, t) in a.variables() {
            let other = &b.variables()[&name];
            assert!(t.allclose(other, 1e-5, 1e-6, false), "{name} differs");
        }
    }

    #[test]
    fn saved_state_restores_the_same_next_step() {
        let _rng = crate::seeded(12);
        let (a, la, b, lb) = two_models();
        let x = Tensor::randn([16, 5], (Kind::Float, Device::Cpu));
        let loss = |l: &nn::Linear| (l.forward(&x) - 1.0).square().mean(Kind::Float);
        let mut first = Adam::new(&a);
        for _ in 0..3 {
            let grads = first.gradients(&loss(&la)).unwrap();
            first.step(&grads, 0.05);
        }
        // The second model takes the first's weights and optimiser state, then both step once.
        let mut b = b;
        b.copy(&a).unwrap();
        let mut second = Adam::new(&b);
        let state: HashMap<String, Tensor> = first.named_state().into_iter().collect();
        assert!(second.load_state(&state).unwrap());
        assert_eq!(second.steps(), 3);
        for (opt, l) in [(&mut first, &la), (&mut second, &lb)] {
            let grads = opt.gradients(&loss(l)).unwrap();
            opt.step(&grads, 0.05);
        }
        for (name, t) in a.variables() {
            assert!(
                t.allclose(&b.variables()[&name], 1e-6, 1e-7, false),
                "{name}"
            );
        }
        // A checkpoint without optimiser state is reported, not mistaken for one.
        assert!(!Adam::new(&b).load_state(&HashMap::new()).unwrap());
    }
}
