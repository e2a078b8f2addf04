//! Evaluation with the protocol of He et al. 2019 (vae-lagging-encoder), reused by Li et al. 2019
//! and Zhu et al. 2020: reconstruction, KL and the ELBO per sentence (beta = 1, one
//! reparameterised sample, an upper bound on the NLL); the importance-weighted NLL
//! log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K with z_k ~ q(z|x);
//! perplexity exp(total NLL / tokens); the mutual information I_q(x; z) from the aggregate
//! posterior; active units (dimension d is active when Cov_x(E_q[z_d]) > 0.01); and what a user
//! sees of z: greedy (or, asked, beam) reconstruction from the posterior mean, scored by token
//! accuracy, exact match and corpus BLEU-4 (REFERENCE §3). Training's per-epoch validation calls
//! `evaluate_elbo` and `latent::reconstruction_score`, the same code.

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::{evenly_spaced, sorted_batches, Batch, Sentences};
use crate::latent::reconstruction_score;
use crate::loss::kl_per_dim;
use crate::model::{reconstruction_nll, Pass, Vae, ZFrom};
use crate::prior::{diagonal_log_prob, Prior, LN_2PI};
use crate::sample::{Decoding, Strategy};

/// Threshold on the variance of the posterior mean across sentences for an active unit.
pub const AU_THRESHOLD: f64 = 0.01;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ElboStats {
    pub sentences: usize,
    /// Tokens counting `</s>`, not `<s>`.
    pub tokens: usize,
    /// Reconstruction NLL per sentence (nats).
    pub rec: f64,
    /// KL(q(z|x) || p(z)) per sentence (nats), against the model's prior.
    pub kl: f64,
    /// KL(q(z|x) || N(0, I)) per sentence: the rate training's objective prices (`--target-kl`),
    /// equal to `kl` until a mixture prior is fitted.
    pub kl_normal: f64,
    /// rec + kl: the negative ELBO per sentence, an upper bound on the NLL (`elbo` in JSON, as
    /// the literature's tables name it).
    #[serde(rename = "elbo")]
    pub neg_elbo: f64,
    pub au: usize,
    /// Mean KL of each latent dimension [Z], for the free-bits-clamped objective.
    #[serde(skip)]
    pub kl_dims: Vec<f64>,
}

/// Scores `seqs` (token ids without `</s>`) in batches of `batch_size`, under no-grad. The sums
/// stay on the device until the last batch: one wait for it, not one per batch.
pub fn evaluate_elbo(
    vae: &Vae,
    seqs: &Sentences,
    batch_size: usize,
    device: Device,
) -> Result<ElboStats> {
    if seqs.is_empty() {
        return Ok(ElboStats::default());
    }
    tch::no_grad(|| {
        let mut tokens = 0usize;
        let mut rec = Tensor::zeros([], (Kind::Double, device));
        let mut kl_dims = Tensor::zeros([vae.latent_dim], (Kind::Double, device));
        let mut kl_prior = Tensor::zeros([], (Kind::Double, device));
        let mut mus = Vec::new();
        for (_, batch) in sorted_batches(seqs, batch_size, device) {
            let out = vae.forward(&batch, &batch.inputs, Pass::Eval, ZFrom::Sample);
            rec += out.rec.sum(Kind::Double);
            kl_dims += kl_per_dim(&out.mu, &out.logvar).sum_dim_intlist(
                [0].as_slice(),
                false,
                Kind::Double,
            ); // [Z]
            if let Prior::Mixture(_) = vae.prior {
                kl_prior += vae.prior.kl(&out.mu, &out.logvar).sum(Kind::Double);
            }
            tokens += batch.n_tokens;
            mus.push(out.mu);
        }
        let n = seqs.len() as f64;
        let kl_dims: Vec<f64> = Vec::try_from((kl_dims / n).to_device(Device::Cpu))?;
        let (rec, kl_normal) = (rec.double_value(&[]) / n, kl_dims.iter().sum::<f64>());
        let kl = match vae.prior {
            Prior::Normal => kl_normal,
            Prior::Mixture(_) => kl_prior.double_value(&[]) / n,
        };
        Ok(ElboStats {
            sentences: seqs.len(),
            tokens,
            rec,
            kl,
            kl_normal,
            neg_elbo: rec + kl,
            au: active_units(&Tensor::cat(&mus, 0), AU_THRESHOLD),
            kl_dims,
        })
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

/// How the importance-weighted NLL's work is cut into passes, by memory rather than a fixed
/// token count: `positions` decoder positions (B x S x T, the LSTM's states) per pass of S
/// samples of every sentence, and `rows` tokens per output-layer block ([rows, V] logits and
/// their log-softmax), with the LSTM and the output layer's products in number format `kind`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IwPasses {
    pub positions: i64,
    pub rows: i64,
    pub kind: Kind,
}

impl IwPasses {
    /// Measured on 2 CPU cores (PTB, 10k words, K = 50 over 314 test sentences, 20.8 s with
    /// the fixed 16,384-token passes before): 32k positions with 128 MiB blocks took 20.9 s
    /// at 0.6 GiB peak memory (was 1.8 GiB); 8 MiB blocks 24.0 s, 2 GiB blocks 25.8 s, 8k or
    /// 128k positions 22.2-22.4 s. The output layer's sgemm is 69% of the cycles either way.
    /// A GPU gets larger passes: it needs the work to stay busy, and has the memory.
    pub fn for_device(vocab: i64, device: Device, kind: Kind) -> IwPasses {
        let (positions, logit_bytes): (i64, i64) = match device {
            Device::Cpu => (32 << 10, 128 << 20),
            _ => (256 << 10, 1 << 30),
        };
        IwPasses {
            positions,
            rows: (logit_bytes / (vocab.max(1) * 8)).max(1),
            kind,
        }
    }
}

/// Importance-weighted log p(x) for each sentence of `batch`: [B]. The K samples of a sentence
/// are scored in passes of S samples of every sentence (`IwPasses`). `mu` and `logvar` [B, Z]
/// are the batch's posterior parameters; the encoder is not run again.
pub fn iw_log_likelihood(
    vae: &Vae,
    batch: &Batch,
    mu: &Tensor,
    logvar: &Tensor,
    k: usize,
    passes: IwPasses,
) -> Tensor {
    let (b, t) = (batch.size(), batch.targets.size()[1]);
    let per_pass = (passes.positions / (b * t).max(1)).max(1);
    let mut log_w = Vec::new(); // [B, S] each
    let mut done = 0i64;
    while done < k as i64 {
        let s = per_pass.min(k as i64 - done);
        // [B*S, ...]: the S samples of a sentence are adjacent rows.
        let mu_r = mu.repeat_interleave_self_int(s, 0, None); // [B*S, Z]
        let logvar_r = logvar.repeat_interleave_self_int(s, 0, None); // [B*S, Z]
        let eps = mu_r.randn_like();
        let z = &mu_r + (&logvar_r * 0.5).exp() * &eps;
        let targets = batch.targets.repeat_interleave_self_int(s, 0, None); // [B*S, T]
        let hidden = vae.decoder.hidden_shared(&batch.inputs, &z, passes.kind); // [B*S, T, H]
        let real = batch.real.repeat_interleave(s, t);
        let log_px_z = -reconstruction_nll(
            &vae.decoder,
            &hidden,
            &targets,
            &real,
            &z,
            Some(passes.rows),
            passes.kind,
        ); // [B*S]
        let log_pz = vae.prior.log_prob(&z); // [B*S]
        let log_qz = diagonal_log_prob(&eps, &logvar_r); // [B*S]
        log_w.push((log_px_z + log_pz - log_qz).view([b, s])); // [B, S]
        done += s;
    }
    Tensor::cat(&log_w, 1).logsumexp([1].as_slice(), false) - (k as f64).ln() // [B]
}

/// Mean importance-weighted NLL per sentence of `seqs` (nats), K samples each, under no-grad.
pub fn iw_nll(vae: &Vae, seqs: &Sentences, k: usize, batch_size: usize, device: Device) -> f64 {
    let mut nll = Tensor::zeros([], (Kind::Double, device));
    tch::no_grad(|| {
        for (_, batch) in sorted_batches(seqs, batch_size, device) {
            nll += batch_iw_nll(vae, &batch, k, Kind::Float).0;
        }
    });
    nll.double_value(&[]) / seqs.len().max(1) as f64
}

/// Summed IW-NLL of one batch (a double scalar, left on the device), with the batch's posterior
/// (`mu`, `logvar` [B, Z]) for MI; the output layer's products in `kind`.
fn batch_iw_nll(vae: &Vae, batch: &Batch, k: usize, kind: Kind) -> (Tensor, Tensor, Tensor) {
    let (mu, logvar) = vae.encoder.forward(&batch.targets, &batch.lengths, false); // [B, Z]
    let passes = IwPasses::for_device(vae.decoder.vocab_size(), batch.targets.device(), kind);
    let nll = -iw_log_likelihood(vae, batch, &mu, &logvar, k, passes).sum(Kind::Double);
    (nll, mu, logvar)
}

/// Posteriors the mutual information's mixture is built from, at most: the estimate costs
/// N^2 x Z, and past this an evenly spaced subset of the evaluation set stands for it.
pub const MI_MAX_SENTENCES: usize = 10_000;

/// He et al.'s estimator of I_q(x; z) over the whole evaluation set, as Li et al. 2019 compute it
/// (`calc_mi_v3`, behind their PTB MI of 5.31): E_x[-H(q(z|x))] - E_z[log q(z)], with z drawn
/// once from each q(z|x) and the aggregate posterior q(z) the mixture of all N posteriors
/// (`mu`, `logvar` [N, Z]). Its ceiling is ln N, so a mixture over one batch of 64 (He et al.'s
/// `calc_mi`) cannot tell 4.2 nats from more; here N is the set, up to `MI_MAX_SENTENCES`.
pub fn mutual_information(mu: &Tensor, logvar: &Tensor) -> f64 {
    let n = mu.size()[0];
    // One sentence's aggregate posterior is its posterior: the MI is exactly 0, where the
    // one-sample estimate below would report noise of several nats.
    if n <= 1 {
        return 0.0;
    }
    let (mu, logvar) = mi_subset(mu, logvar, MI_MAX_SENTENCES as i64);
    let (n, nz) = (mu.size()[0], mu.size()[1]);
    let (mu, logvar) = (mu.to_kind(Kind::Double), logvar.to_kind(Kind::Double));
    let neg_entropy = ((&logvar + 1.0).sum_dim_intlist([-1].as_slice(), false, Kind::Double)
        * -0.5
        - 0.5 * nz as f64 * LN_2PI)
        .mean(Kind::Double)
        .double_value(&[]);
    let std = (&logvar * 0.5).exp();
    let z = Vae::reparameterize(&mu, &logvar); // [N, Z]

    // Rows of z in chunks, so that [chunk, N, Z] stays near 4M elements whatever N is.
    let chunk = (4_000_000 / (n * nz).max(1)).max(1);
    let mut log_qz_sum = 0.0f64;
    for z_rows in z.split(chunk, 0) {
        let eps = (z_rows.unsqueeze(1) - mu.unsqueeze(0)) / std.unsqueeze(0); // [C, N, Z]
        let log_density = diagonal_log_prob(&eps, &logvar.unsqueeze(0).expand_as(&eps)); // [C, N]
        let log_qz = log_density.logsumexp([1].as_slice(), false) - (n as f64).ln(); // [C]
        log_qz_sum += log_qz.sum(Kind::Double).double_value(&[]);
    }
    neg_entropy - log_qz_sum / n as f64
}

/// At most `max` of the N posteriors [N, Z], evenly spaced, so a long evaluation set is still
/// represented from end to end (sets are often sorted by length).
fn mi_subset(mu: &Tensor, logvar: &Tensor, max: i64) -> (Tensor, Tensor) {
    let n = mu.size()[0];
    if n <= max {
        return (mu.shallow_clone(), logvar.shallow_clone());
    }
    let idx: Vec<i64> = evenly_spaced(n as usize, max as usize)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let idx = Tensor::from_slice(&idx).to_device(mu.device());
    (mu.index_select(0, &idx), logvar.index_select(0, &idx))
}

/// exp(total NLL / tokens), the perplexity of the literature (tokens count `</s>`, not `<s>`).
pub fn perplexity(total_nll: f64, tokens: usize) -> f64 {
    if tokens == 0 {
        return f64::NAN;
    }
    (total_nll / tokens as f64).exp()
}

/// Everything `textvae eval` reports; the JSON keys are the field names (the ELBO pass's
/// inline: `sentences`, `tokens`, `rec`, `kl`, `kl_normal`, `elbo`, `au`).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct EvalReport {
    #[serde(flatten)]
    pub elbo: ElboStats,
    pub nll: f64,
    pub ppl: f64,
    pub mi: f64,
    pub iw_samples: usize,
    /// The number format of the output layer's products in the NLL's samples: "f32" or "bf16".
    pub iw_precision: &'static str,
    /// How the reconstructions were decoded: "greedy" (the default) or "beam K" (or, from a
    /// library caller, "sampled at temperature T").
    pub rec_decoding: String,
    /// Reconstruction from the posterior mean, as `textvae reconstruct --score`: token
    /// accuracy, exact-match rate, corpus BLEU-4 (0-100).
    pub rec_acc: f64,
    pub rec_exact: f64,
    pub rec_bleu: f64,
}

/// How `evaluate` runs: importance samples and batch size for the NLL and MI, and how the
/// reconstructions are decoded (in chunks of `decode_batch`, as `reconstruct` does).
pub struct EvalOptions {
    pub iw_samples: usize,
    /// The output layer's number format in the NLL's samples (float32 or bfloat16).
    pub iw_kind: Kind,
    pub batch_size: usize,
    pub decoding: Decoding,
    pub decode_batch: usize,
}

/// The full protocol over `seqs`: the ELBO pass (shared with training's validation), the
/// importance-weighted NLL with K samples batch by batch, the MI over the whole set (its mixture
/// of every posterior), then the reconstructions.
/// `progress` is called with the number of tokens (`</s>` counted) whose K samples are done,
/// first with 0 as they start.
pub fn evaluate(
    vae: &Vae,
    seqs: &Sentences,
    opts: &EvalOptions,
    device: Device,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport> {
    let elbo = evaluate_elbo(vae, seqs, opts.batch_size, device)?;
    let mut done = 0usize;
    progress(done); // the samples start now: the ELBO pass is not their pace
    let mut nll = Tensor::zeros([], (Kind::Double, device));
    let (mut mus, mut logvars) = (Vec::new(), Vec::new());
    let mi = tch::no_grad(|| {
        for (_, batch) in sorted_batches(seqs, opts.batch_size, device) {
            let (batch_nll, mu, logvar) = batch_iw_nll(vae, &batch, opts.iw_samples, opts.iw_kind);
            nll += batch_nll;
            mus.push(mu);
            logvars.push(logvar);
            done += batch.n_tokens;
            progress(done);
            // Each batch of sentences meets new shapes (K samples of its own length).
            crate::runtime::release_free_memory();
        }
        if mus.is_empty() {
            return 0.0;
        }
        mutual_information(&Tensor::cat(&mus, 0), &Tensor::cat(&logvars, 0)) // [N, Z]
    });
    let rec = reconstruction_score(vae, seqs, &opts.decoding, opts.decode_batch, device)?;
    let n = seqs.len().max(1) as f64;
    let nll = nll.double_value(&[]);
    Ok(EvalReport {
        nll: nll / n,
        ppl: perplexity(nll, elbo.tokens),
        elbo,
        mi,
        iw_samples: opts.iw_samples,
        iw_precision: crate::runtime::precision_name(opts.iw_kind),
        rec_decoding: match opts.decoding.strategy {
            Strategy::Greedy => "greedy".to_string(),
            Strategy::Beam { width } => format!("beam {width}"),
            // Not what `textvae eval` asks for, but a library caller may.
            Strategy::Sample { temperature, .. } => format!("sampled at temperature {temperature}"),
        },
        rec_acc: rec.token_accuracy,
        rec_exact: rec.exact_match,
        rec_bleu: rec.bleu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_arithmetic() {
        // Two sentences of 4 and 6 tokens (with </s>) at 10 and 20 nats: exp(30 / 10).
        assert!((perplexity(30.0, 10) - 3f64.exp()).abs() < 1e-12);
        // A uniform model over V tokens has perplexity V.
        let v: f64 = 1000.0;
        assert!((perplexity(v.ln() * 57.0, 57) - v).abs() < 1e-9);
        assert!(perplexity(1.0, 0).is_nan());
    }

    #[test]
    fn mutual_information_is_zero_for_an_encoder_that_ignores_its_input() {
        let _rng = crate::seeded(5);
        let n = 400;
        let mu = Tensor::from_slice(&[0.3f32, -0.2, 0.5, 0.0])
            .view([1, 4])
            .repeat([n, 1]);
        let logvar = Tensor::from_slice(&[-0.5f32, 0.1, 0.0, -1.0])
            .view([1, 4])
            .repeat([n, 1]);
        let mi = mutual_information(&mu, &logvar);
        assert!(mi.abs() < 0.05, "mi {mi}");
        let one = mutual_information(&mu.narrow(0, 0, 1), &logvar.narrow(0, 0, 1));
        assert_eq!(one, 0.0);
        // Posteriors far apart and narrow: MI approaches its ceiling ln N.
        let mu = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([n, 1]) * 10.0;
        let logvar = Tensor::full([n, 1], -4.0, (Kind::Float, Device::Cpu));
        let mi = mutual_information(&mu, &logvar);
        assert!(
            (mi - (n as f64).ln()).abs() < 0.05,
            "mi {mi} vs ln N {}",
            (n as f64).ln()
        );
    }

    #[test]
    fn mutual_information_reaches_ln_n_past_one_batch_and_caps_the_set() {
        let _rng = crate::seeded(6);
        // 3,000 sentences in 32 dimensions: the z rows go through the mixture in ~40-row chunks,
        // and the ceiling is ln 3000 = 8.0, far past one batch's ln 64 = 4.16.
        let n = 3000;
        let first = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([n, 1]) * 10.0;
        let mu = Tensor::cat(
            &[first, Tensor::zeros([n, 31], (Kind::Float, Device::Cpu))],
            1,
        );
        let logvar = Tensor::full([n, 32], -4.0, (Kind::Float, Device::Cpu));
        let mi = mutual_information(&mu, &logvar);
        assert!((mi - (n as f64).ln()).abs() < 0.05, "mi {mi}");
        // Past MI_MAX_SENTENCES an evenly spaced subset stands for the set.
        let n = MI_MAX_SENTENCES as i64 + 2000;
        let mu = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([n, 1]) * 10.0;
        let logvar = Tensor::full([n, 1], -4.0, (Kind::Float, Device::Cpu));
        let mi = mutual_information(&mu, &logvar);
        let ceiling = (MI_MAX_SENTENCES as f64).ln();
        assert!((mi - ceiling).abs() < 0.05, "mi {mi} vs {ceiling}");
    }

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
