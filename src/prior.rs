//! The prior p(z). Training's objective uses the standard normal N(0, I) throughout; once a run
//! ends, a diagonal Gaussian mixture is fitted to the aggregate posterior
//! q(z) = 1/N sum_n q(z|x_n) of the training sentences and stored with the kept weights
//! (ex-post density estimation, Ghosh et al. 2020; the aggregate posterior is the prior that
//! maximises the ELBO for a given encoder and decoder, Hoffman & Johnson 2016, Tomczak & Welling
//! 2018). N(0, I) leaves mass where no sentence's posterior lives: the ELBO pays for it in the KL
//! term (KL = I(x; z) + KL(q(z) || p(z))) and samples drawn there decode to sentences the decoder
//! never learned to write. The mixture is fitted by EM on the posteriors themselves, each a
//! Gaussian rather than a point (Vasconcelos & Lippman 1999's hierarchical EM): no sampling
//! noise, and the components' variances include the posteriors' own.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use rand::seq::index::sample;
use tch::{Device, Kind, Tensor};

use crate::loss::kl_per_dim;

/// The names of the mixture's tensors in a weights file: means [K, Z], log-variances [K, Z] and
/// log-weights [K], float64.
pub const MU: &str = "prior.mu";
pub const LOGVAR: &str = "prior.logvar";
pub const LOG_WEIGHT: &str = "prior.log_weight";

pub const LN_2PI: f64 = 1.837_877_066_409_345_3;

/// Samples of q(z|x) per sentence in the Monte Carlo KL to a mixture (which has no closed form):
/// with 16, the mean over a few hundred sentences is within about 0.05 nats.
pub const KL_SAMPLES: i64 = 16;

/// Rows of a [rows, K] block of component densities: bounds the memory of the log-density and
/// of the EM's responsibilities whatever N and K are (4M float64 numbers, 32 MiB).
const BLOCK_ELEMENTS: i64 = 4 << 20;

/// EM stops when the mean log-likelihood per sentence gains less than this in an iteration...
const EM_TOLERANCE: f64 = 1e-3;
/// ... or after this many iterations. On tatoeba (27k training sentences, 1,000 components)
/// 20 iterations gave a held-out NLL of 30.89 and 98 (to a tolerance of 1e-4) 30.92 in five
/// times the time: the bound on the training posteriors still rises, the held-out NLL does not.
pub const EM_MAX_ITERATIONS: usize = 20;
/// A component's variance never falls below this (a component that wins no sentence would
/// otherwise collapse onto its mean).
const MIN_VAR: f64 = 1e-6;

/// A diagonal Gaussian mixture over z, its tensors float64 on one device.
#[derive(Debug)]
pub struct Mixture {
    pub mu: Tensor,
    pub logvar: Tensor,
    pub log_weight: Tensor,
}

/// The model's prior: the standard normal the objective was trained with, or the mixture fitted
/// after training.
#[derive(Debug)]
pub enum Prior {
    Normal,
    Mixture(Mixture),
}

/// What a fit did, for the log.
#[derive(Clone, Debug, PartialEq)]
pub struct FitReport {
    pub sentences: usize,
    pub components: usize,
    pub iterations: usize,
    /// Mean over the sentences of E_q(z|x)[log p(z)] under the fitted mixture (a lower bound EM
    /// raises at every iteration), and the same under N(0, I).
    pub expected_log_prior: f64,
    pub expected_log_normal: f64,
}

impl Prior {
    /// The prior stored among a weights file's tensors: the mixture when the file has it.
    pub fn from_tensors(tensors: &HashMap<String, Tensor>, latent_dim: i64) -> Result<Prior> {
        let (Some(mu), Some(logvar), Some(log_weight)) = (
            tensors.get(MU),
            tensors.get(LOGVAR),
            tensors.get(LOG_WEIGHT),
        ) else {
            return Ok(Prior::Normal);
        };
        let k = log_weight.size1()?;
        ensure!(
            mu.size() == [k, latent_dim] && logvar.size() == [k, latent_dim] && k > 0,
            "the prior's tensors have shapes {:?}, {:?} and {:?}, not a mixture over z of size {latent_dim}",
            mu.size(),
            logvar.size(),
            log_weight.size()
        );
        Ok(Prior::Mixture(Mixture {
            mu: mu.to_kind(Kind::Double),
            logvar: logvar.to_kind(Kind::Double),
            log_weight: log_weight.to_kind(Kind::Double),
        }))
    }

    /// The tensors a weights file stores for this prior (none for the standard normal), on the CPU.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            Prior::Normal => Vec::new(),
            Prior::Mixture(m) => [
                (MU, &m.mu),
                (LOGVAR, &m.logvar),
                (LOG_WEIGHT, &m.log_weight),
            ]
            .into_iter()
            .map(|(name, t)| (name.to_string(), t.to_device(Device::Cpu)))
            .collect(),
        }
    }

    pub fn to_device(&self, device: Device) -> Prior {
        match self {
            Prior::Normal => Prior::Normal,
            Prior::Mixture(m) => Prior::Mixture(Mixture {
                mu: m.mu.to_device(device),
                logvar: m.logvar.to_device(device),
                log_weight: m.log_weight.to_device(device),
            }),
        }
    }

    /// In words, for logs and `info`-like output.
    pub fn describe(&self) -> String {
        match self {
            Prior::Normal => "N(0, I)".to_string(),
            Prior::Mixture(m) => format!(
                "a mixture of {} Gaussians fitted to the training posteriors",
                m.log_weight.size()[0]
            ),
        }
    }

    /// log p(z) for `z` [R, Z]: [R], float32.
    pub fn log_prob(&self, z: &Tensor) -> Tensor {
        match self {
            Prior::Normal => standard_log_prob(z),
            Prior::Mixture(m) => m.log_prob(&z.to_kind(Kind::Double)).to_kind(Kind::Float),
        }
    }

    /// `n` draws of z [n, Z] on `device`, float32.
    pub fn sample(&self, n: i64, latent_dim: i64, device: Device) -> Result<Tensor> {
        match self {
            Prior::Normal => Ok(Tensor::f_randn([n, latent_dim], (Kind::Float, device))?),
            Prior::Mixture(m) => m.sample(n, device),
        }
    }

    /// KL(q(z|x) || p(z)) per sentence for posteriors `mu`, `logvar` [B, Z]: [B], float32. Closed
    /// form for N(0, I); for the mixture a Monte Carlo mean over `KL_SAMPLES` draws of each q(z|x).
    pub fn kl(&self, mu: &Tensor, logvar: &Tensor) -> Tensor {
        match self {
            Prior::Normal => normal_kl(mu, logvar),
            Prior::Mixture(_) => {
                let b = mu.size()[0];
                let mu_r = mu.repeat_interleave_self_int(KL_SAMPLES, 0, None); // [B*S, Z]
                let logvar_r = logvar.repeat_interleave_self_int(KL_SAMPLES, 0, None);
                let eps = mu_r.randn_like();
                let z = &mu_r + (&logvar_r * 0.5).exp() * &eps;
                let log_q = diagonal_log_prob(&eps, &logvar_r); // [B*S]
                (log_q - self.log_prob(&z)).view([b, KL_SAMPLES]).mean_dim(
                    [1].as_slice(),
                    false,
                    Kind::Float,
                ) // [B]
            }
        }
    }
}

/// KL(N(mu, exp(logvar)) || N(0, I)) per sentence: [B].
pub fn normal_kl(mu: &Tensor, logvar: &Tensor) -> Tensor {
    kl_per_dim(mu, logvar).sum_dim_intlist([-1].as_slice(), false, Kind::Float)
}

/// log N(z; 0, I) summed over the last dimension: [R].
pub fn standard_log_prob(z: &Tensor) -> Tensor {
    diagonal_log_prob(z, &z.zeros_like())
}

/// log N(x; mu, exp(logvar)) summed over the last dimension, written through the standardised
/// `eps` = (x - mu) / sigma: -1/2 sum_d (eps_d^2 + logvar_d + ln 2 pi).
pub fn diagonal_log_prob(eps: &Tensor, logvar: &Tensor) -> Tensor {
    (eps.square() + logvar + LN_2PI).sum_dim_intlist([-1].as_slice(), false, Kind::Float) * -0.5
}

impl Mixture {
    /// log p(z) for `z` [R, Z] float64: [R], in blocks of rows.
    fn log_prob(&self, z: &Tensor) -> Tensor {
        let terms = ComponentTerms::new(self);
        let parts: Vec<Tensor> = z
            .split(block_rows(self.log_weight.size()[0]), 0)
            .iter()
            .map(|block| {
                terms
                    .expected_log_density(block, None)
                    .logsumexp([1].as_slice(), false)
            })
            .collect();
        Tensor::cat(&parts, 0)
    }

    fn sample(&self, n: i64, device: Device) -> Result<Tensor> {
        let k = self
            .log_weight
            .exp()
            .f_multinomial(n, true)?
            .to_device(self.mu.device()); // [n]
        let mu = self.mu.index_select(0, &k); // [n, Z]
        let std = (self.logvar.index_select(0, &k) * 0.5).exp();
        Ok((&mu + std * mu.randn_like())
            .to_kind(Kind::Float)
            .to_device(device))
    }
}

/// Rows per block of a [rows, K] computation.
fn block_rows(k: i64) -> i64 {
    (BLOCK_ELEMENTS / k.max(1)).max(1)
}

/// What every row's component densities share: per component, 1 / var [K, Z], mu / var [K, Z]
/// and the constant sum_d (mu_d^2 / var_d + log var_d + ln 2 pi) - 2 log w [K].
struct ComponentTerms {
    inv_var: Tensor,
    mu_inv_var: Tensor,
    constant: Tensor,
}

impl ComponentTerms {
    fn new(m: &Mixture) -> Self {
        let inv_var = (-&m.logvar).exp();
        let mu_inv_var = &m.mu * &inv_var;
        let nz = m.mu.size()[1] as f64;
        let constant =
            (&m.mu * &mu_inv_var + &m.logvar).sum_dim_intlist([1].as_slice(), false, Kind::Double)
                + nz * LN_2PI
                - &m.log_weight * 2.0;
        Self {
            inv_var,
            mu_inv_var,
            constant,
        }
    }

    /// log w_k + E[log N(z; mu_k, var_k)] for rows z ~ N(x, diag(`x_var`)) [R, Z], or for the
    /// points x themselves when `x_var` is None: [R, K]. The square is expanded, so the [R, K, Z]
    /// differences are never built: sum_d ((x_d^2 + s_d) / var_d - 2 x_d mu_d / var_d) + const.
    fn expected_log_density(&self, x: &Tensor, x_var: Option<&Tensor>) -> Tensor {
        let second = match x_var {
            Some(v) => x.square() + v,
            None => x.square(),
        };
        let quad = second.matmul(&self.inv_var.tr()) - x.matmul(&self.mu_inv_var.tr()) * 2.0; // [R, K]
        (quad + self.constant.unsqueeze(0)) * -0.5
    }
}

/// Fits a mixture of `k` diagonal Gaussians (at most one per sentence) to the mixture of the N
/// posteriors `mu`, `logvar` [N, Z] by EM, in float64 on their device. The components start on
/// `k` posterior means drawn by `seed`, with the aggregate's variance and equal weights.
pub fn fit_mixture(
    mu: &Tensor,
    logvar: &Tensor,
    k: usize,
    seed: u64,
) -> Result<(Mixture, FitReport)> {
    let n = mu.size()[0];
    ensure!(n > 0, "no sentences to fit the prior to");
    ensure!(k > 0, "a mixture needs at least one component");
    let k = k.min(n as usize);
    let (x, x_var) = (mu.to_kind(Kind::Double), logvar.to_kind(Kind::Double).exp());
    let mut rng = crate::seeded_rng(seed);
    let start: Vec<i64> = sample(&mut rng, n as usize, k)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let start = Tensor::from_slice(&start).to_device(x.device());
    let spread =
        x.var_dim([0].as_slice(), false, true) + x_var.mean_dim([0].as_slice(), true, Kind::Double); // [1, Z]
    let mut m = Mixture {
        mu: x.index_select(0, &start),
        logvar: spread.log().expand([k as i64, x.size()[1]], false).copy(),
        log_weight: Tensor::full([k as i64], -(k as f64).ln(), (Kind::Double, x.device())),
    };
    let mut last = f64::NEG_INFINITY;
    let mut iterations = 0;
    while iterations < EM_MAX_ITERATIONS {
        let (next, mean_ll) = em_step(&m, &x, &x_var);
        iterations += 1;
        // The bound EM raises is that of the mixture it started the step from.
        let converged = mean_ll - last < EM_TOLERANCE;
        last = mean_ll;
        m = next;
        if converged {
            break;
        }
    }
    let (_, expected_log_prior) = em_step(&m, &x, &x_var);
    let sum_sq = (x.square() + &x_var).sum_dim_intlist([1].as_slice(), false, Kind::Double); // [N]
    let expected_log_normal =
        -0.5 * (sum_sq.mean(Kind::Double).double_value(&[]) + x.size()[1] as f64 * LN_2PI);
    let report = FitReport {
        sentences: n as usize,
        components: k,
        iterations,
        expected_log_prior,
        expected_log_normal,
    };
    Ok((m, report))
}

/// One EM step over every posterior, block by block: the responsibilities of the components
/// for each posterior, then weights, means and variances from their sums (the variance includes
/// the posteriors' own). Returns the new mixture and the mean bound on E_q[log p(z)] under the
/// old one.
fn em_step(m: &Mixture, x: &Tensor, x_var: &Tensor) -> (Mixture, f64) {
    let (n, k) = (x.size()[0], m.log_weight.size()[0]);
    let terms = ComponentTerms::new(m);
    let opts = (Kind::Double, x.device());
    let mut weight = Tensor::zeros([k], opts);
    let mut first = Tensor::zeros_like(&m.mu); // [K, Z]
    let mut second = Tensor::zeros_like(&m.mu);
    let mut ll = Tensor::zeros([], opts);
    let rows = block_rows(k);
    for (xb, vb) in x.split(rows, 0).iter().zip(x_var.split(rows, 0).iter()) {
        let log_r = terms.expected_log_density(xb, Some(vb)); // [R, K]
        let lse = log_r.logsumexp([1].as_slice(), true); // [R, 1]
        ll += lse.sum(Kind::Double);
        let r = (log_r - lse).exp(); // [R, K]
        weight += r.sum_dim_intlist([0].as_slice(), false, Kind::Double);
        let rt = r.tr(); // [K, R]
        first += rt.matmul(xb);
        second += rt.matmul(&(xb.square() + vb));
    }
    let count = weight.clamp_min(1e-300).unsqueeze(1); // [K, 1]
    let mu = &first / &count;
    let var = (&second / &count - mu.square()).clamp_min(MIN_VAR);
    let next = Mixture {
        mu,
        logvar: var.log(),
        log_weight: (weight / n as f64).clamp_min(1e-300).log(),
    };
    (next, ll.double_value(&[]) / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn a_mixture_of_one_standard_component_is_the_standard_normal() {
        let _g = crate::seeded(1);
        let m = Prior::Mixture(Mixture {
            mu: Tensor::zeros([1, 3], (Kind::Double, Device::Cpu)),
            logvar: Tensor::zeros([1, 3], (Kind::Double, Device::Cpu)),
            log_weight: Tensor::zeros([1], (Kind::Double, Device::Cpu)),
        });
        let z = Tensor::randn([50, 3], (Kind::Float, Device::Cpu)) * 2.0;
        let diff = (m.log_prob(&z) - Prior::Normal.log_prob(&z)).abs().max();
        assert!(diff.double_value(&[]) < 1e-5);
    }

    #[test]
    fn mixture_log_prob_is_the_log_sum_of_weighted_component_densities() {
        let _g = crate::seeded(2);
        let opts = (Kind::Double, Device::Cpu);
        let m = Mixture {
            mu: Tensor::randn([4, 3], opts) * 2.0,
            logvar: Tensor::randn([4, 3], opts) * 0.5,
            log_weight: Tensor::from_slice(&[0.1f64, 0.2, 0.3, 0.4]).log(),
        };
        let z = Tensor::randn([7, 3], opts);
        let got: Vec<f64> = Vec::try_from(m.log_prob(&z)).unwrap();
        let rows = |t: &Tensor| -> Vec<Vec<f64>> { Vec::try_from(t).unwrap() };
        let (zs, mus, logvars) = (rows(&z), rows(&m.mu), rows(&m.logvar));
        let weights: Vec<f64> = Vec::try_from(m.log_weight.exp()).unwrap();
        for (r, g) in got.iter().enumerate() {
            let direct: f64 = (0..4)
                .map(|c| {
                    let log_density: f64 = (0..3)
                        .map(|d| {
                            let var = logvars[c][d].exp();
                            let diff = zs[r][d] - mus[c][d];
                            -0.5 * (diff * diff / var + logvars[c][d] + LN_2PI)
                        })
                        .sum();
                    weights[c] * log_density.exp()
                })
                .sum::<f64>()
                .ln();
            assert!(close(*g, direct, 1e-9), "row {r}: {g} against {direct}");
        }
    }

    #[test]
    fn em_recovers_two_separated_clusters_of_posteriors() {
        let _g = crate::seeded(3);
        let opts = (Kind::Double, Device::Cpu);
        // 300 posteriors around (-4, -4) and 100 around (4, 4), each with variance 0.25.
        let a = Tensor::randn([300, 2], opts) * 0.5 - 4.0;
        let b = Tensor::randn([100, 2], opts) * 0.5 + 4.0;
        let mu = Tensor::cat(&[a, b], 0);
        let logvar = Tensor::full([400, 2], 0.25f64.ln(), opts);
        let (m, report) = fit_mixture(&mu, &logvar, 2, 5).unwrap();
        let mut weights: Vec<f64> = Vec::try_from(m.log_weight.exp()).unwrap();
        weights.sort_by(f64::total_cmp);
        assert!(close(weights[0], 0.25, 1e-6) && close(weights[1], 0.75, 1e-6));
        // Each component's variance: the spread of its means (0.25) plus the posteriors' (0.25).
        let var: Vec<f64> = Vec::try_from(m.logvar.exp().flatten(0, -1)).unwrap();
        assert!(var.iter().all(|v| close(*v, 0.5, 0.12)), "{var:?}");
        assert!(report.expected_log_prior > report.expected_log_normal + 5.0);
        assert!(report.iterations < EM_MAX_ITERATIONS);
    }

    #[test]
    fn the_mixture_fitted_to_standard_posteriors_is_near_the_standard_normal() {
        let _g = crate::seeded(4);
        let opts = (Kind::Double, Device::Cpu);
        // Posteriors whose aggregate is N(0, I): means N(0, 0.5 I), variances 0.5.
        let mu = Tensor::randn([2000, 2], opts) * 0.5f64.sqrt();
        let logvar = Tensor::full([2000, 2], 0.5f64.ln(), opts);
        let (_, report) = fit_mixture(&mu, &logvar, 8, 1).unwrap();
        // Nothing to gain over N(0, I) beyond what 8 components fit of the sampling noise.
        assert!(close(
            report.expected_log_prior,
            report.expected_log_normal,
            0.05
        ));
    }

    #[test]
    fn mixture_samples_and_kl_follow_the_components() {
        let _g = crate::seeded(6);
        let opts = (Kind::Double, Device::Cpu);
        let prior = Prior::Mixture(Mixture {
            mu: Tensor::from_slice(&[-3.0f64, 3.0]).view([2, 1]),
            logvar: Tensor::full([2, 1], 0.01f64.ln(), opts),
            log_weight: Tensor::from_slice(&[0.2f64, 0.8]).log(),
        });
        let z = prior.sample(10_000, 1, Device::Cpu).unwrap();
        assert_eq!(z.kind(), Kind::Float);
        let right = z
            .gt(0.0)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        assert!(close(right, 0.8, 0.02), "{right}");
        // A posterior equal to one component: KL = -log w of that component (the other is far).
        let kl = prior.kl(
            &Tensor::from_slice(&[3.0f32]).view([1, 1]),
            &Tensor::from_slice(&[0.01f32.ln()]).view([1, 1]),
        );
        assert!(close(kl.double_value(&[0]), -(0.8f64.ln()), 1e-3));
    }

    #[test]
    fn a_prior_survives_its_tensors_and_refuses_wrong_shapes() {
        let opts = (Kind::Double, Device::Cpu);
        let m = Prior::Mixture(Mixture {
            mu: Tensor::ones([3, 2], opts),
            logvar: Tensor::zeros([3, 2], opts),
            log_weight: Tensor::full([3], -(3f64.ln()), opts),
        });
        let tensors: HashMap<String, Tensor> = m.tensors().into_iter().collect();
        let back = Prior::from_tensors(&tensors, 2).unwrap();
        let z = Tensor::zeros([1, 2], (Kind::Float, Device::Cpu));
        assert_eq!(
            back.log_prob(&z).double_value(&[0]),
            m.log_prob(&z).double_value(&[0])
        );
        assert!(Prior::from_tensors(&tensors, 3).is_err());
        assert!(matches!(
            Prior::from_tensors(&HashMap::new(), 2).unwrap(),
            Prior::Normal
        ));
    }
}
