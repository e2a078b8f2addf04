//! Evaluation on held-out sentences: reconstruction, KL and the ELBO per sentence (beta = 1, one
//! reparameterised sample, an upper bound on the NLL), and active units (He et al. 2019: latent
//! dimension d is active when Cov_x(E_q[z_d]) > 0.01). Training's per-epoch validation calls this
//! same code.

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::{sorted_batches, Batch};
use crate::loss::kl_per_dim;
use crate::model::Vae;

/// Threshold on the variance of the posterior mean across sentences for an active unit.
pub const AU_THRESHOLD: f64 = 0.01;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ElboStats {
    pub sentences: usize,
    /// Tokens counting `</s>`, not `<s>`.
    pub tokens: usize,
    /// Reconstruction NLL per sentence (nats).
    pub rec: f64,
    /// KL(q(z|x) || p(z)) per sentence (nats).
    pub kl: f64,
    /// rec + kl: the negative ELBO per sentence, an upper bound on the NLL.
    pub elbo: f64,
    pub au: usize,
}

/// Scores `seqs` (token ids without `</s>`) in batches of `batch_size`, under no-grad.
pub fn evaluate_elbo(vae: &Vae, seqs: &[Vec<i64>], batch_size: usize, device: Device) -> ElboStats {
    if seqs.is_empty() {
        return ElboStats::default();
    }
    tch::no_grad(|| {
        let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let (mut rec, mut kl, mut tokens) = (0.0f64, 0.0f64, 0usize);
        let mut mus = Vec::new();
        for idx in sorted_batches(&lengths, batch_size) {
            let rows: Vec<&[i64]> = idx.iter().map(|&i| seqs[i].as_slice()).collect();
            let batch = Batch::new(&rows, device);
            let out = vae.forward(&batch.targets, &batch.lengths, &batch.inputs, false, true);
            rec += out.rec.sum(Kind::Double).double_value(&[]);
            kl += kl_per_dim(&out.mu, &out.logvar)
                .sum(Kind::Double)
                .double_value(&[]);
            tokens += batch.n_tokens;
            mus.push(out.mu.to_device(Device::Cpu));
        }
        let n = seqs.len() as f64;
        let (rec, kl) = (rec / n, kl / n);
        ElboStats {
            sentences: seqs.len(),
            tokens,
            rec,
            kl,
            elbo: rec + kl,
            au: active_units(&Tensor::cat(&mus, 0), AU_THRESHOLD),
        }
    })
}

/// Number of dimensions whose posterior mean varies across sentences: `mu` [N, Z].
pub fn active_units(mu: &Tensor, threshold: f64) -> usize {
    if mu.size()[0] < 2 {
        return 0;
    }
    let var = mu
        .to_kind(Kind::Double)
        .var_dim([0].as_slice(), true, false); // [Z]
    var.gt(threshold).sum(Kind::Int64).int64_value(&[]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_units_counts_the_dimensions_that_vary() {
        let _rng = crate::seeded(3);
        let n = 500;
        let varying = Tensor::randn([n, 3], (Kind::Float, Device::Cpu)); // var ~ 1
        let tiny = Tensor::randn([n, 2], (Kind::Float, Device::Cpu)) * 0.01; // var ~ 1e-4
        let constant = Tensor::ones([n, 4], (Kind::Float, Device::Cpu)) * 3.0;
        let mu = Tensor::cat(&[varying, tiny, constant], 1);
        assert_eq!(active_units(&mu, AU_THRESHOLD), 3);
    }
}
