//! The objective and the counter-measures to posterior collapse: closed-form Gaussian KL, free
//! bits (Kingma et al. 2016, per dimension as in Li et al. 2019), KL annealing schedules
//! (linear, He et al. 2019; logistic, Bowman et al. 2016; cyclical, Fu et al. 2019) and word
//! dropout (Bowman et al. 2016); a minimum desired rate in hinge form (Pelsmaeker & Aziz 2020)
//! and the bag-of-words loss from z (Zhao et al. 2017); the learning rate's linear decay over
//! the run's budget (Li, Yumer & Ramanan 2020).

use tch::{Kind, Tensor};

use crate::config::KlSchedule;
use crate::tokenizer::{EOS, PAD, UNK};

/// KL(N(mu, exp(logvar)) || N(0, I)) per dimension: [B, Z].
/// KL_d = 1/2 (mu_d^2 + exp(logvar_d) - 1 - logvar_d).
pub fn kl_per_dim(mu: &Tensor, logvar: &Tensor) -> Tensor {
    (mu.square() + logvar.exp() - 1.0 - logvar) * 0.5
}

/// The KL term the optimiser sees, for `kl` [B, Z]: max(target, sum_d max(lambda, mean_B KL_d)).
/// With lambda = target = 0 this is the batch mean of the sentence KL. Dimensions below lambda get
/// no gradient, so the encoder can spend lambda nats per dimension for free; below the target
/// rate the whole term is flat, so z may hold `target` nats at no cost.
pub fn kl_term(kl: &Tensor, free_bits: f64, target: f64) -> Tensor {
    kl_term_of_dim_means(
        &kl.mean_dim([0].as_slice(), false, Kind::Float),
        free_bits,
        target,
    )
}

/// `kl_term` from the per-dimension means [Z] of the KL, as validation accumulates them.
pub fn kl_term_of_dim_means(per_dim: &Tensor, free_bits: f64, target: f64) -> Tensor {
    let per_dim = if free_bits > 0.0 {
        per_dim.clamp_min(free_bits)
    } else {
        per_dim.shallow_clone()
    };
    let total = per_dim.sum(per_dim.kind());
    if target > 0.0 {
        total.clamp_min(target)
    } else {
        total
    }
}

/// Bag-of-words NLL per sentence (Zhao et al. 2017): -sum_t log p_bow(x_t | z) over the real
/// tokens of `targets` [B, T] (not `</s>`, which every sentence has), given the bag-of-words
/// logits [B, V] predicted from z: [B].
pub fn bow_nll(logits: &Tensor, targets: &Tensor) -> Tensor {
    let logp = logits.log_softmax(-1, Kind::Float); // [B, V]
    let real = targets.ne(PAD).logical_and(&targets.ne(EOS)); // [B, T]
    let ids = targets.masked_fill(&real.logical_not(), 0); // [B, T]
    let picked = logp.gather(1, &ids, false) * real.to_kind(Kind::Float); // [B, T]
    -picked.sum_dim_intlist([1].as_slice(), false, Kind::Float)
}

/// How much of a run's budget is spent, in [0, 1]: the larger of the wall-clock share (when there
/// is a time budget) and the share of optimisation steps.
pub fn budget_progress(secs: f64, budget_secs: Option<f64>, steps: u64, total_steps: u64) -> f64 {
    let by_steps = steps as f64 / total_steps.max(1) as f64;
    let by_time = budget_secs.map_or(0.0, |b| secs / b);
    by_steps.max(by_time).clamp(0.0, 1.0)
}

/// The learning rate at `progress` in [0, 1] of the budget: `start` until the last `cooldown`
/// share of the budget, then a linear decay to `floor` at the end (warmup-stable-decay without
/// the warmup, Hu et al. 2024; Li, Yumer & Ramanan 2020 for linear decay under a fixed budget).
/// A floor above the start leaves the rate at the start.
pub fn linear_lr(start: f64, floor: f64, cooldown: f64, progress: f64) -> f64 {
    let floor = floor.min(start);
    let left = (1.0 - progress.clamp(0.0, 1.0)) / cooldown.max(1e-12);
    floor + (start - floor) * left.min(1.0)
}

/// beta at optimisation step `step` of a run whose first `ae_steps` steps pretrain an
/// autoencoder (beta 0) and whose schedule starts after them.
pub fn beta_at(schedule: &KlSchedule, ae_steps: u64, step: u64) -> f64 {
    match step.checked_sub(ae_steps) {
        Some(s) => schedule.beta(s),
        None => 0.0,
    }
}

impl KlSchedule {
    /// beta at optimisation step `step` (0-based).
    pub fn beta(&self, step: u64) -> f64 {
        match *self {
            KlSchedule::Constant { beta } => beta,
            KlSchedule::Linear { start, steps } => {
                let frac = (step as f64 / steps as f64).min(1.0);
                start + (1.0 - start) * frac
            }
            KlSchedule::Logistic { k, x0 } => 1.0 / (1.0 + (-k * (step as f64 - x0)).exp()),
            KlSchedule::Cyclical {
                period,
                ratio,
                start,
            } => {
                let pos = (step % period) as f64 / period as f64;
                start + (1.0 - start) * (pos / ratio).min(1.0)
            }
        }
    }
}

/// Word dropout on decoder inputs [B, T]: each real token after `<s>` becomes `<unk>` with
/// probability `p`. `<s>` (column 0), padding and — since only inputs pass through here — the
/// targets are never touched. Off when `train` is false.
pub fn word_dropout(inputs: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return inputs.shallow_clone();
    }
    let drop = Tensor::rand(inputs.size(), (Kind::Float, inputs.device()))
        .lt(p)
        .logical_and(&inputs.ne(PAD)); // [B, T]
    let t = inputs.size()[1];
    let not_first = Tensor::arange(t, (Kind::Int64, inputs.device()))
        .gt(0)
        .unsqueeze(0); // [1, T]
    inputs.masked_fill(&drop.logical_and(&not_first), UNK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::BOS;

    fn f(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    #[test]
    fn budget_progress_takes_whichever_budget_runs_out_first() {
        assert_eq!(budget_progress(0.0, None, 0, 100), 0.0);
        assert_eq!(budget_progress(30.0, None, 25, 100), 0.25);
        assert_eq!(budget_progress(30.0, Some(60.0), 25, 100), 0.5);
        assert_eq!(budget_progress(30.0, Some(600.0), 25, 100), 0.25);
        assert_eq!(budget_progress(90.0, Some(60.0), 200, 100), 1.0);
        assert_eq!(budget_progress(0.0, None, 3, 0), 1.0);
    }

    #[test]
    fn linear_lr_runs_from_start_to_floor() {
        assert_eq!(linear_lr(1e-3, 1e-5, 1.0, 0.0), 1e-3);
        assert!((linear_lr(1e-3, 0.0, 1.0, 0.25) - 7.5e-4).abs() < 1e-15);
        assert_eq!(linear_lr(1e-3, 1e-5, 1.0, 1.0), 1e-5);
        assert_eq!(linear_lr(1e-3, 1e-5, 1.0, 7.0), 1e-5);
        // With a cooldown of a quarter the rate holds for three quarters of the budget.
        assert_eq!(linear_lr(1e-3, 0.0, 0.25, 0.5), 1e-3);
        assert_eq!(linear_lr(1e-3, 0.0, 0.25, 0.75), 1e-3);
        assert!((linear_lr(1e-3, 0.0, 0.25, 0.875) - 5e-4).abs() < 1e-15);
        // A start below the floor stays where it is instead of rising to it.
        assert_eq!(linear_lr(1e-6, 1e-5, 1.0, 0.5), 1e-6);
    }

    #[test]
    fn closed_form_kl_matches_monte_carlo() {
        let _rng = crate::seeded(0);
        let mu = Tensor::from_slice(&[0.5f32, -1.0, 0.0, 2.0]).view([1, 4]);
        let logvar = Tensor::from_slice(&[0.0f32, -1.0, 0.7, -2.0]).view([1, 4]);
        let closed = f(&kl_per_dim(&mu, &logvar).sum(Kind::Double));
        // E_q[log q(z) - log p(z)] from 200k samples.
        let n = 200_000;
        let eps = Tensor::randn([n, 4], (Kind::Double, tch::Device::Cpu));
        let mu = mu.to_kind(Kind::Double);
        let logvar = logvar.to_kind(Kind::Double);
        let z = &mu + (&logvar * 0.5).exp() * &eps;
        let log_q = ((eps.square() + &logvar + (2.0 * std::f64::consts::PI).ln()) * -0.5)
            .sum_dim_intlist([1].as_slice(), false, Kind::Double);
        let log_p = ((z.square() + (2.0 * std::f64::consts::PI).ln()) * -0.5).sum_dim_intlist(
            [1].as_slice(),
            false,
            Kind::Double,
        );
        let mc = f(&(log_q - log_p).mean(Kind::Double));
        assert!((closed - mc).abs() < 0.02, "closed {closed} vs mc {mc}");
        assert!(closed > 0.0);
    }

    #[test]
    fn kl_is_zero_at_the_prior_and_free_bits_clamp_per_dimension() {
        let zero = Tensor::zeros([3, 5], (Kind::Float, tch::Device::Cpu));
        assert_eq!(f(&kl_per_dim(&zero, &zero).sum(Kind::Float)), 0.0);
        // Batch of 2, dims with mean KL 0.1 and 2.0.
        let kl = Tensor::from_slice(&[0.0f32, 1.0, 0.2, 3.0]).view([2, 2]);
        assert!((f(&kl_term(&kl, 0.0, 0.0)) - 2.1).abs() < 1e-6);
        assert!((f(&kl_term(&kl, 0.5, 0.0)) - 2.5).abs() < 1e-6);
    }

    #[test]
    fn the_target_rate_is_a_floor_on_the_total_with_no_gradient_below_it() {
        let kl = Tensor::from_slice(&[0.0f32, 1.0, 0.2, 3.0])
            .view([2, 2])
            .set_requires_grad(true);
        // Total 2.1: below a target of 5 the term is 5 and flat; above it, the plain KL.
        let below = kl_term(&kl, 0.0, 5.0);
        assert!((f(&below) - 5.0).abs() < 1e-6);
        below.backward();
        assert_eq!(f(&kl.grad().abs().sum(Kind::Float)), 0.0);
        assert!((f(&kl_term(&kl, 0.0, 1.0)) - 2.1).abs() < 1e-6);
        // Free bits first, then the floor: sum(max(0.5, [0.1, 2.0])) = 2.5, then max(2.2, 2.5).
        assert!((f(&kl_term(&kl, 0.5, 2.2)) - 2.5).abs() < 1e-6);
    }

    #[test]
    fn bow_nll_scores_each_real_word_of_the_sentence() {
        // Vocabulary of 6, uniform logits: each counted word costs ln 6.
        let logits = Tensor::zeros([2, 6], (Kind::Float, tch::Device::Cpu));
        let targets = Tensor::from_slice(&[4i64, 5, 5, EOS, 4, EOS, PAD, PAD]).view([2, 4]);
        let nll = bow_nll(&logits, &targets);
        let l6 = 6f64.ln();
        assert!((nll.double_value(&[0]) - 3.0 * l6).abs() < 1e-5);
        assert!((nll.double_value(&[1]) - l6).abs() < 1e-5);
        // A peaked prediction of the right words costs less.
        let peaked = Tensor::from_slice(&[0f32, 0., 0., 0., 5., 5.]).view([1, 6]);
        let one = targets.narrow(0, 0, 1);
        assert!(bow_nll(&peaked, &one).double_value(&[0]) < 3.0 * l6 - 1.0);
    }

    #[test]
    fn schedules_take_their_documented_values() {
        let lin = KlSchedule::Linear {
            start: 0.1,
            steps: 100,
        };
        assert!((lin.beta(0) - 0.1).abs() < 1e-12);
        assert!((lin.beta(50) - 0.55).abs() < 1e-12);
        assert_eq!(lin.beta(100), 1.0);
        assert_eq!(lin.beta(10_000), 1.0);

        let log = KlSchedule::Logistic {
            k: 0.0025,
            x0: 2500.0,
        };
        assert!((log.beta(2500) - 0.5).abs() < 1e-12);
        assert!(log.beta(0) < 0.002);
        assert!(log.beta(10_000) > 0.99999);

        let cyc = KlSchedule::Cyclical {
            period: 100,
            ratio: 0.5,
            start: 0.0,
        };
        assert_eq!(cyc.beta(0), 0.0);
        assert!((cyc.beta(25) - 0.5).abs() < 1e-12);
        assert_eq!(cyc.beta(50), 1.0);
        assert_eq!(cyc.beta(99), 1.0);
        assert_eq!(cyc.beta(100), 0.0);
        assert!((cyc.beta(125) - 0.5).abs() < 1e-12);

        assert_eq!(KlSchedule::Constant { beta: 0.3 }.beta(777), 0.3);

        // Autoencoder pretraining: beta 0, then the schedule from its own start.
        assert_eq!(beta_at(&lin, 40, 0), 0.0);
        assert_eq!(beta_at(&lin, 40, 39), 0.0);
        assert!((beta_at(&lin, 40, 40) - 0.1).abs() < 1e-12);
        assert!((beta_at(&lin, 40, 90) - 0.55).abs() < 1e-12);
        assert_eq!(beta_at(&lin, 0, 50), lin.beta(50));
    }

    #[test]
    fn word_dropout_rate_and_what_it_never_touches() {
        let _rng = crate::seeded(1);
        let (b, t) = (64i64, 50i64);
        let mut rows = vec![];
        for i in 0..b {
            let len = 10 + i % 40; // real tokens incl. <s>
            for j in 0..t {
                rows.push(if j == 0 {
                    BOS
                } else if j < len {
                    100 + j
                } else {
                    PAD
                });
            }
        }
        let inputs = Tensor::from_slice(&rows).view([b, t]);
        let targets = inputs.copy();
        let out = word_dropout(&inputs, 0.25, true);
        // Targets are a separate tensor and stay as they were.
        assert!(targets.equal(&inputs));
        // <s> and padding are never replaced.
        assert!(out.select(1, 0).eq(BOS).all().int64_value(&[]) == 1);
        assert!(
            out.eq(UNK)
                .logical_and(&inputs.eq(PAD))
                .sum(Kind::Int64)
                .int64_value(&[])
                == 0
        );
        // The rate among eligible tokens is about p.
        let eligible = inputs
            .ne(PAD)
            .logical_and(&inputs.ne(BOS))
            .sum(Kind::Float)
            .double_value(&[]);
        let dropped = out.eq(UNK).sum(Kind::Float).double_value(&[]);
        let rate = dropped / eligible;
        assert!((rate - 0.25).abs() < 0.03, "rate {rate}");
        // Off in evaluation.
        assert!(word_dropout(&inputs, 0.25, false).equal(&inputs));
    }
}
