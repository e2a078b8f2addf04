//! Adam (Kingma & Ba 2015) over tch tensors, with PyTorch's defaults and update rule and an
//! optional decoupled weight decay per parameter (AdamW, Loshchilov & Hutter 2019), run by
//! libtorch's fused kernel (`torch.optim.AdamW(fused=True)`, which is `torch.optim.Adam`'s update
//! where the decay is 0; src/fused_adam.cpp, since tch does not wrap it): one pass over each
//! weight instead of seven, with gradient clipping and the skip of a non-finite step decided on
//! the device, so a step never waits for the host. The moments and the step count are named
//! tensors, saved beside the weights, so a resumed run goes on with the optimiser where it was
//! instead of restarting Adam's estimates from zero.

use std::collections::HashMap;
use std::ffi::c_char;

use anyhow::{bail, ensure, Result};
use tch::{nn, Device, Kind, Tensor};
use torch_sys::C_tensor;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The prefix of the optimiser's tensors among a checkpoint's: `optim.step`, `optim.m.NAME`,
/// `optim.v.NAME` for each trainable variable NAME.
pub const PREFIX: &str = "optim.";

extern "C" {
    fn textvae_fused_adam(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: usize,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        grad_scale: *const C_tensor,
        found_inf: *const C_tensor,
    ) -> *mut c_char;
}

pub struct Adam {
    /// The trainable variables by name, in name order.
    params: Vec<(String, Tensor)>,
    /// First and second moment estimates, one per parameter.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken (the bias corrections' t), as the kernel reads it: float, [1], on the device.
    step: Tensor,
    /// Decoupled weight decay of each parameter (AdamW, Loshchilov & Hutter 2019): every step
    /// takes lr * decay of the weight off it, whatever its gradient.
    decay: Vec<f64>,
}

/// The two per-step scalars the kernel reads on the device: gradients are divided by
/// `grad_scale`, and the step is skipped — weights, moments and step count unchanged — where
/// `skip` is 1. Both float, [1].
pub struct StepControl {
    pub grad_scale: Tensor,
    pub skip: Tensor,
}

impl StepControl {
    /// Neither scaled nor skipped: every step taken as its gradient says.
    pub fn plain(device: Device) -> Self {
        Self {
            grad_scale: Tensor::ones([1], (Kind::Float, device)),
            skip: Tensor::zeros([1], (Kind::Float, device)),
        }
    }

    /// Clipping to a global norm of `clip` (as tch's `clip_grad_norm`: scale by clip / (norm +
    /// 1e-6) where that is below 1), and a skip unless `norm` and `loss` are both finite.
    pub fn clip_or_skip(norm: &Tensor, loss: &Tensor, clip: f64) -> Self {
        let finite = norm.isfinite().logical_and(&loss.isfinite());
        Self {
            grad_scale: ((norm + 1e-6) / clip)
                .clamp_min(1.0)
                .to_kind(Kind::Float)
                .reshape([1]),
            skip: finite.logical_not().to_kind(Kind::Float).reshape([1]),
        }
    }
}

/// Raw handles of `ts` for the C side, which only reads them (the tensors' data is updated in
/// place, not the handles).
fn handles<'a>(ts: impl Iterator<Item = &'a Tensor>) -> Vec<*mut C_tensor> {
    ts.map(|t| t.as_ptr() as *mut C_tensor).collect()
}

impl Adam {
    pub fn new(vs: &nn::VarStore) -> Self {
        let params = trainable(vs);
        let zeros =
            |params: &[(String, Tensor)]| params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            m: zeros(&params),
            v: zeros(&params),
            decay: vec![0.0; params.len()],
            params,
            step: Tensor::zeros([1], (Kind::Float, vs.device())),
        }
    }

    /// Decoupled weight decay `decay` on the parameters whose name `applies` accepts (the rest
    /// keep theirs).
    pub fn with_weight_decay(mut self, decay: f64, applies: impl Fn(&str) -> bool) -> Self {
        for ((name, _), d) in self.params.iter().zip(&mut self.decay) {
            if applies(name) {
                *d = decay;
            }
        }
        self
    }

    /// d loss / d parameter for each parameter, in `step`'s order, as new tensors (undefined for
    /// a parameter the loss does not reach). Unlike `backward`, nothing is accumulated into the
    /// parameters' `.grad`, so there is nothing to zero before the next step: two passes over
    /// every weight saved per step.
    pub fn gradients(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
        Ok(Tensor::f_run_backward(&[loss], &params, false, false)?)
    }

    /// Steps taken (the bias corrections' t); reads the count back from the device.
    pub fn steps(&self) -> i64 {
        self.step.double_value(&[0]) as i64
    }

    /// Forgets the moments and the step count, as a new optimiser would have them.
    pub fn reset(&mut self) {
        tch::no_grad(|| {
            for t in self.m.iter_mut().chain(self.v.iter_mut()) {
                let _ = t.zero_();
            }
            let _ = self.step.zero_();
        });
    }

    /// One update at learning rate `lr` from `grads` (`gradients`' order), divided by
    /// `ctl.grad_scale`, unless `ctl.skip`: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
    /// p <- p (1 - lr decay) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), as
    /// torch.optim.AdamW (torch.optim.Adam where decay is 0). The gradients are consumed (the
    /// kernel scales them in place).
    pub fn step(&mut self, grads: &[Tensor], lr: f64, ctl: &StepControl) -> Result<()> {
        let reached: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined()).collect();
        // One kernel call per decay value (one call unless some weights decay).
        let mut groups: Vec<(f64, Vec<usize>)> = Vec::new();
        for i in reached {
            match groups.iter_mut().find(|(d, _)| *d == self.decay[i]) {
                Some((_, g)) => g.push(i),
                None => groups.push((self.decay[i], vec![i])),
            }
        }
        tch::no_grad(|| -> Result<()> {
            // As torch.optim.Adam's fused path: count the step first, take it back if skipped.
            let _ = self.step.g_add_scalar_(1.0);
            for (decay, group) in &groups {
                self.fused_step(group, grads, lr, *decay, ctl)?;
            }
            let _ = self.step.g_sub_(&ctl.skip);
            Ok(())
        })
    }

    /// The fused kernel over the parameters `idx`, the step count already advanced.
    fn fused_step(
        &self,
        idx: &[usize],
        grads: &[Tensor],
        lr: f64,
        decay: f64,
        ctl: &StepControl,
    ) -> Result<()> {
        let params = handles(idx.iter().map(|&i| &self.params[i].1));
        let grad_handles = handles(idx.iter().map(|&i| &grads[i]));
        let m = handles(idx.iter().map(|&i| &self.m[i]));
        let v = handles(idx.iter().map(|&i| &self.v[i]));
        // SAFETY: every handle points to a live tensor borrowed for this call, the four lists
        // have `idx.len()` entries each, and the C side copies the handles' tensors
        // (reference-counted) before it returns.
        let err = unsafe {
            textvae_fused_adam(
                params.as_ptr(),
                grad_handles.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                idx.len(),
                self.step.as_ptr(),
                lr,
                BETA1,
                BETA2,
                EPS,
                decay,
                ctl.grad_scale.as_ptr(),
                ctl.skip.as_ptr(),
            )
        };
        // SAFETY: `err` is what textvae_fused_adam returned, released once here.
        if let Some(msg) = unsafe { crate::native::take_message(err) } {
            bail!("the fused Adam step failed: {msg}");
        }
        Ok(())
    }

    /// The state as named tensors (on the CPU), for a checkpoint.
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(Device::Cpu);
        let mut out = vec![(format!("{PREFIX}step"), Tensor::from_slice(&[self.steps()]))];
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
            for (((name, _), m), v) in self.params.iter().zip(&mut self.m).zip(&mut self.v) {
                for (which, dst) in [("m", m), ("v", v)] {
                    let key = format!("{PREFIX}{which}.{name}");
                    copy_named(tensors, &key, dst, "the optimiser state")?;
                }
            }
            Ok(())
        })?;
        tch::no_grad(|| {
            let _ = self.step.fill_(step as f64);
        });
        Ok(true)
    }
}

/// The trainable variables of `vs` by name, in name order.
fn trainable(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Copies the checkpoint tensor `key` into `dst` (float32, same shape), or says which one
/// `what` lacks.
fn copy_named(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    dst: &mut Tensor,
    what: &str,
) -> Result<()> {
    let src = tensors.get(key);
    ensure!(
        src.is_some_and(|s| s.size() == dst.size()),
        "{what} has no {key} of shape {:?}",
        dst.size()
    );
    if let Some(src) = src {
        dst.copy_(&src.to_kind(Kind::Float));
    }
    Ok(())
}

/// The prefix of the weight average's tensors in a checkpoint: `average.NAME` per variable.
pub const AVERAGE_PREFIX: &str = "average.";

/// An exponential moving average of the trainable weights (Polyak & Juditsky 1992; the form of
/// Tensorflow's `ExponentialMovingAverage`): after each step the average moves a share
/// `1 - decay_t` of the way to the weights, with `decay_t = min(decay, (1 + t) / (10 + t))` so
/// that the first steps' random weights do not linger in it. The average is what validation
/// judges and `model.safetensors` keeps; training goes on from the weights themselves.
pub struct WeightAverage {
    decay: f64,
    /// (variable, its average), in name order.
    pairs: Vec<(String, Tensor, Tensor)>,
}

impl WeightAverage {
    /// An average starting at the weights `vs` holds now.
    pub fn new(vs: &nn::VarStore, decay: f64) -> Self {
        let pairs = trainable(vs)
            .into_iter()
            .map(|(name, t)| {
                let avg = tch::no_grad(|| t.detach().copy());
                (name, t, avg)
            })
            .collect();
        Self { decay, pairs }
    }

    /// The share of the way the average moves towards the weights after step `step` (1-based).
    pub fn rate(decay: f64, step: u64) -> f64 {
        let t = step as f64;
        1.0 - decay.min((1.0 + t) / (10.0 + t))
    }

    /// Moves the average towards the weights after optimiser step `step` (1-based).
    pub fn update(&mut self, step: u64) {
        let w = Self::rate(self.decay, step);
        tch::no_grad(|| {
            for (_, t, avg) in &mut self.pairs {
                let _ = avg.lerp_(t, w);
            }
        });
    }

    /// Starts the average afresh at the weights (after the decoder is re-initialised).
    pub fn reset(&mut self) {
        tch::no_grad(|| {
            for (_, t, avg) in &mut self.pairs {
                avg.copy_(t);
            }
        });
    }

    /// Exchanges the weights and their average: called twice, everything is as it was.
    pub fn swap(&mut self) {
        tch::no_grad(|| {
            for (_, t, avg) in &mut self.pairs {
                let held = t.detach().copy();
                t.copy_(avg);
                avg.copy_(&held);
            }
        });
    }

    /// The average as named tensors (on the CPU), for a resume point.
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        self.pairs
            .iter()
            .map(|(name, _, avg)| {
                (
                    format!("{AVERAGE_PREFIX}{name}"),
                    avg.to_device(Device::Cpu),
                )
            })
            .collect()
    }

    /// Restores the average `named_state` gave. False when the tensors hold none (a run that
    /// did not average before): the average starts at the weights.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<bool> {
        let first = self
            .pairs
            .first()
            .map(|(n, _, _)| format!("{AVERAGE_PREFIX}{n}"));
        if first.is_none_or(|k| !tensors.contains_key(&k)) {
            self.reset();
            return Ok(false);
        }
        tch::no_grad(|| {
            for (name, _, avg) in &mut self.pairs {
                let key = format!("{AVERAGE_PREFIX}{name}");
                copy_named(tensors, &key, avg, "the weight average")?;
            }
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::Device;

    fn plain() -> StepControl {
        StepControl::plain(Device::Cpu)
    }

    fn scalar(x: f64) -> Tensor {
        Tensor::from(x as f32)
    }

    #[test]
    fn the_step_control_clips_to_the_norm_and_skips_what_is_not_finite() {
        let get = |c: &StepControl| (c.grad_scale.double_value(&[0]), c.skip.double_value(&[0]));
        let (scale, skip) = get(&StepControl::clip_or_skip(&scalar(10.0), &scalar(3.0), 5.0));
        assert!((scale - 2.0).abs() < 1e-5 && skip == 0.0, "{scale} {skip}");
        assert_eq!(
            get(&StepControl::clip_or_skip(&scalar(1.0), &scalar(3.0), 5.0)),
            (1.0, 0.0)
        );
        for (norm, loss) in [(f64::NAN, 1.0), (f64::INFINITY, 1.0), (1.0, f64::NAN)] {
            let c = StepControl::clip_or_skip(&scalar(norm), &scalar(loss), 5.0);
            assert_eq!(c.skip.double_value(&[0]), 1.0, "{norm} {loss}");
        }
    }

    /// A skipped step changes nothing, even with NaN gradients; a scale of 2 is half the gradient.
    #[test]
    fn a_skipped_step_changes_nothing_and_the_scale_divides_the_gradient() {
        let _rng = crate::seeded(13);
        let (a, la, b, lb) = two_models();
        let x = Tensor::randn([16, 5], (Kind::Float, Device::Cpu));
        let loss = |l: &nn::Linear| (l.forward(&x) - 1.0).square().mean(Kind::Float);
        let (mut first, mut second) = (Adam::new(&a), Adam::new(&b));
        let grads = first.gradients(&loss(&la)).unwrap();
        first.step(&grads, 0.05, &plain()).unwrap();
        let before: Vec<(String, Tensor)> = first.named_state();
        let weights: Vec<Tensor> = first.params.iter().map(|(_, p)| p.copy()).collect();
        let nan: Vec<Tensor> = grads.iter().map(|g| g.full_like(f64::NAN)).collect();
        let skip = StepControl {
            skip: Tensor::ones([1], (Kind::Float, Device::Cpu)),
            ..plain()
        };
        first.step(&nan, 0.05, &skip).unwrap();
        assert_eq!(first.steps(), 1);
        for ((_, p), w) in first.params.iter().zip(&weights) {
            assert!(p.equal(w));
        }
        for ((name, t), (_, u)) in first.named_state().iter().zip(&before) {
            assert!(t.equal(u), "{name}");
        }

        // The second model: the same first step, then both take one more from half / scaled
        // gradients.
        let grads = second.gradients(&loss(&lb)).unwrap();
        second.step(&grads, 0.05, &plain()).unwrap();
        let half: Vec<Tensor> = first
            .gradients(&loss(&la))
            .unwrap()
            .iter()
            .map(|g| g / 2.0)
            .collect();
        first.step(&half, 0.05, &plain()).unwrap();
        let twice = StepControl {
            grad_scale: Tensor::from_slice(&[2.0f32]),
            ..plain()
        };
        let grads = second.gradients(&loss(&lb)).unwrap();
        second.step(&grads, 0.05, &twice).unwrap();
        for (name, t) in a.variables() {
            assert!(
                t.allclose(&b.variables()[&name], 1e-6, 1e-7, false),
                "{name}"
            );
        }
    }

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
    fn the_average_warms_up_then_moves_by_one_minus_the_decay() {
        // (1 + t) / (10 + t) caps the decay early: after step 1 the average moves 9/11 of the way.
        assert!((WeightAverage::rate(0.999, 1) - 9.0 / 11.0).abs() < 1e-12);
        assert!((WeightAverage::rate(0.999, 100_000) - 0.001).abs() < 1e-12);
        assert!(WeightAverage::rate(0.9, 5) > WeightAverage::rate(0.9, 50));
    }

    /// The average follows the weights by lerp, swapping twice restores both exactly, and its
    /// named state loads into a fresh average.
    #[test]
    fn the_average_tracks_swaps_and_reloads_the_weights() {
        let _rng = crate::seeded(17);
        let (a, mut la, _, _) = two_models();
        let start = la.ws.copy();
        let mut avg = WeightAverage::new(&a, 0.5);
        tch::no_grad(|| {
            la.ws.copy_(&(&start + 2.0));
        });
        avg.update(1_000); // rate 0.5
        let avg_ws = |avg: &WeightAverage| {
            avg.pairs
                .iter()
                .find(|p| p.0 == "l.weight")
                .unwrap()
                .2
                .copy()
        };
        assert!(avg_ws(&avg).allclose(&(&start + 1.0), 1e-6, 1e-6, false));
        let live = la.ws.copy();
        avg.swap();
        assert!(la.ws.allclose(&(&start + 1.0), 1e-6, 1e-6, false));
        avg.swap();
        assert!(la.ws.equal(&live) && avg_ws(&avg).allclose(&(&start + 1.0), 1e-6, 1e-6, false));

        let saved: HashMap<String, Tensor> = avg.named_state().into_iter().collect();
        assert!(saved.contains_key("average.l.weight") && saved.contains_key("average.l.bias"));
        let mut fresh = WeightAverage::new(&a, 0.5);
        assert!(fresh.load_state(&saved).unwrap());
        assert!(avg_ws(&fresh).equal(&avg_ws(&avg)));
        // Tensors without an average (a checkpoint of a run that had none): it starts afresh.
        assert!(!fresh.load_state(&HashMap::new()).unwrap());
        assert!(avg_ws(&fresh).equal(&la.ws));
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
            ours.step(&grads, 0.01, &plain()).unwrap();
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
    fn weight_decay_follows_libtorch_adamw_on_the_weights_it_names() {
        let _rng = crate::seeded(13);
        // Two independent regressions in one store: decaying one leaves the other's gradients
        // as they were.
        let layers = |vs: &nn::VarStore| {
            let layer = |name: &str| nn::linear(vs.root() / name, 5, 3, Default::default());
            (layer("p"), layer("q"))
        };
        let first = nn::VarStore::new(Device::Cpu);
        let mut stores = vec![(layers(&first), first)];
        for _ in 0..3 {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let l = layers(&vs);
            vs.copy(&stores[0].1).unwrap();
            stores.push((l, vs));
        }
        let x = Tensor::randn([16, 5], (Kind::Float, Device::Cpu));
        let y = Tensor::randn([16, 3], (Kind::Float, Device::Cpu));
        let loss = |(p, q): &(nn::Linear, nn::Linear)| {
            ((p.forward(&x) - &y).square() + (q.forward(&x) - &y).square()).mean(Kind::Float)
        };
        let mut ours = [
            Adam::new(&stores[0].1).with_weight_decay(0.1, |_| true),
            Adam::new(&stores[1].1).with_weight_decay(0.1, |n| n.starts_with("p.")),
            Adam::new(&stores[2].1),
        ];
        let mut theirs = nn::AdamW::default()
            .wd(0.1)
            .build(&stores[3].1, 0.01)
            .unwrap();
        for _ in 0..10 {
            for (opt, (l, _)) in ours.iter_mut().zip(&stores) {
                let grads = opt.gradients(&loss(l)).unwrap();
                opt.step(&grads, 0.01, &plain()).unwrap();
            }
            theirs.zero_grad();
            loss(&stores[3].0).backward();
            theirs.step();
        }
        let same = |s: usize, t: usize, name: &str| {
            let (s, t) = (
                &stores[s].1.variables()[name],
                &stores[t].1.variables()[name],
            );
            s.allclose(t, 1e-5, 1e-6, false)
        };
        for name in ["p.weight", "p.bias", "q.weight", "q.bias"] {
            assert!(same(0, 3, name), "{name} differs from AdamW's");
        }
        // Decay on p only: p as AdamW's, q as plain Adam's.
        assert!(same(1, 3, "p.weight") && same(1, 3, "p.bias"));
        assert!(same(1, 2, "q.weight") && same(1, 2, "q.bias"));
        assert!(!same(2, 3, "q.weight"), "decay changed nothing");
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
            first.step(&grads, 0.05, &plain()).unwrap();
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
            opt.step(&grads, 0.05, &plain()).unwrap();
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
