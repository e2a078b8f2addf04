//! The latent space as a tool: encoding sentences to their posterior q(z|x) and walking between
//! two codes (Bowman et al. 2016, "homotopies") by linear or spherical interpolation (slerp,
//! White 2016, which keeps the path where Gaussian mass lives), shown at evenly spaced points or
//! as the sentences met along the path.

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::data::{sorted_batches, Batch, Corpus, Sentences};
use crate::model::{reconstruction_nll, Vae, TRAIN_ROWS_PER_PASS};
use crate::optim::{Adam, StepControl};
use crate::prior::{fit_mixture, normal_kl, standard_log_prob, FitReport, Prior};
use crate::sample::{decode_ids, Decoding};
use crate::tokenizer::{TextTokenizer, EOS, UNK};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Lerp,
    Slerp,
}

/// (1 - t) a + t b.
pub fn lerp(a: &[f64], b: &[f64], t: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| (1.0 - t) * x + t * y)
        .collect()
}

/// Spherical interpolation: sin((1-t) w) / sin w * a + sin(t w) / sin w * b, with w the angle
/// between a and b. Falls back to lerp when a and b are (anti)parallel or zero, where sin w
/// vanishes.
pub fn slerp(a: &[f64], b: &[f64], t: f64) -> Vec<f64> {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        return lerp(a, b, t);
    }
    let cos = (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (na * nb)).clamp(-1.0, 1.0);
    let omega = cos.acos();
    let sin = omega.sin();
    if sin.abs() < 1e-6 {
        return lerp(a, b, t);
    }
    let (wa, wb) = (((1.0 - t) * omega).sin() / sin, (t * omega).sin() / sin);
    a.iter().zip(b).map(|(x, y)| wa * x + wb * y).collect()
}

/// `steps` evenly spaced points strictly between a and b, plus both ends: steps + 2 points.
pub fn path(a: &[f64], b: &[f64], steps: usize, method: Method) -> Result<Vec<Vec<f64>>> {
    if steps == 0 {
        bail!("--steps must be at least 1 (the number of points between the two ends)");
    }
    if a.len() != b.len() {
        bail!(
            "latent codes of different sizes: {} and {}",
            a.len(),
            b.len()
        );
    }
    let n = steps + 1;
    Ok((0..=n)
        .map(|i| {
            let t = i as f64 / n as f64;
            match method {
                Method::Lerp => lerp(a, b, t),
                Method::Slerp => slerp(a, b, t),
            }
        })
        .collect())
}

/// Where the lines of a walk come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Spread {
    /// The path is decoded at 16 points per step and the lines are spread over the sentences met
    /// along it, each once, in order (fewer lines where it meets fewer sentences).
    Sentences,
    /// Evenly spaced points in z (Bowman et al. 2016's homotopies): a sentence that covers a long
    /// stretch of the path fills several lines.
    Even,
}

/// A walk spread over sentences is decoded at this many points per step, so that a sentence
/// covering a sixteenth of a step is still met.
const DENSE_PER_STEP: usize = 16;
/// ... but at no more points than this in all: a walk of more lines is decoded at its own points.
const MAX_DENSE_POINTS: usize = 4097;

/// The points strictly between the ends at which a walk of `steps` is decoded to be spread over
/// sentences: never fewer than `steps`.
pub fn dense_steps(steps: usize) -> usize {
    ((steps + 1) * DENSE_PER_STEP - 1)
        .min(MAX_DENSE_POINTS - 2)
        .max(steps)
}

/// The lines of a walk decoded at many points, in path order, shown as `shown` lines: runs of the
/// same sentence collapse to one (the sentences met along the path), and `shown` of those are
/// taken evenly spread over them, the first and last included; all of them when there are no
/// more than `shown`.
pub fn spread_over_sentences(texts: &[String], shown: usize) -> Vec<String> {
    let mut met: Vec<&String> = Vec::new();
    for t in texts {
        if met.last() != Some(&t) {
            met.push(t);
        }
    }
    if met.len() <= shown || shown < 2 {
        return met.into_iter().cloned().collect();
    }
    // round(i m / n) with m > n: the index moves by more than 1 a line, so no sentence is taken
    // twice.
    let (m, n) = (met.len() - 1, shown - 1);
    let mut lines: Vec<String> = (0..shown)
        .map(|i| met[(2 * i * m + n) / (2 * n)].clone())
        .collect();
    // A path that leaves a sentence and comes back (a b a) can have the spread take it on
    // both sides of what it skipped: shown twice in a row, it would read as a stall.
    lines.dedup();
    lines
}

/// The prior is fitted to the posteriors of at most this many sentences, evenly spaced through
/// the corpus: past that, more sentences move a mixture of a few thousand components little and
/// cost encoding time and memory.
pub const MAX_PRIOR_SENTENCES: usize = 200_000;

/// Fits a mixture of `components` Gaussians to the aggregate posterior of `seqs` (the training
/// sentences), on `device`: `prior::fit_mixture` over their posterior means and variances.
pub fn fit_prior(
    vae: &Vae,
    seqs: &Sentences,
    components: usize,
    seed: u64,
    device: Device,
) -> Result<(Prior, FitReport)> {
    // A copy only when the set is larger than the fit takes.
    let subset;
    let seqs = if seqs.len() > MAX_PRIOR_SENTENCES {
        subset = seqs.spread(MAX_PRIOR_SENTENCES);
        &subset
    } else {
        seqs
    };
    let (mu, logvar) = encode(vae, seqs, ENCODE_BATCH, device);
    let (mixture, report) = tch::no_grad(|| {
        fit_mixture(
            &mu.to_device(device),
            &logvar.to_device(device),
            components,
            seed,
        )
    })?;
    Ok((Prior::Mixture(mixture), report))
}

/// Mean KL per sentence of `seqs`' posteriors to N(0, I) and to the model's prior (None for no
/// sentences).
pub fn mean_kls(vae: &Vae, seqs: &Sentences, device: Device) -> Option<(f64, f64)> {
    if seqs.is_empty() {
        return None;
    }
    let (mu, logvar) = encode(vae, seqs, ENCODE_BATCH, device);
    let (mu, logvar) = (mu.to_device(device), logvar.to_device(device));
    tch::no_grad(|| {
        let mean = |kl: Tensor| kl.mean(Kind::Double).double_value(&[]);
        Some((
            mean(normal_kl(&mu, &logvar)),
            mean(vae.prior.kl(&mu, &logvar)),
        ))
    })
}

/// Sentences per encoder pass when the prior is fitted.
const ENCODE_BATCH: usize = 256;

/// Posterior means and log-variances of `seqs`, in input order: ([N, Z], [N, Z]) on the CPU.
pub fn encode(vae: &Vae, seqs: &Sentences, batch_size: usize, device: Device) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let n = seqs.len() as i64;
        let mut mu = Tensor::zeros([n, vae.latent_dim], (Kind::Float, Device::Cpu));
        let mut logvar = Tensor::zeros([n, vae.latent_dim], (Kind::Float, Device::Cpu));
        for (idx, batch) in sorted_batches(seqs, batch_size, device) {
            let (m, lv) = vae.encoder.forward(&batch.targets, &batch.lengths, false);
            let at = positions(&idx);
            let _ = mu.index_copy_(0, &at, &m.to_device(Device::Cpu));
            let _ = logvar.index_copy_(0, &at, &lv.to_device(Device::Cpu));
        }
        (mu, logvar)
    })
}

/// Adam's learning rate for refining codes: a step of about this much per coordinate, in units
/// of the prior's standard deviation.
const REFINE_LR: f64 = 0.05;
/// Sentences refined at once.
const REFINE_BATCH: usize = 128;

/// The codes that best explain `seqs` to the decoder: from `mu` [N, Z] (the posterior means, in
/// input order), `steps` Adam steps on each sentence's -log p(x|z) - log N(z; 0, I), towards
/// the maximum a posteriori z under the decoder and the prior the model was trained with. The
/// encoder amortises this search over all sentences and misses it for single ones (Kim et al.
/// 2018 refine its output by the same gradients). Not the fitted mixture: its components are as
/// narrow as the posteriors they were fitted to, so its gradient holds z at the component the
/// encoder chose (measured: no change in reconstructions); and not log p(x|z) alone, which
/// reproduces more sentences with codes 20 nats less likely under the prior than any it
/// samples. `steps` = 0 gives `mu` back. [N, Z] on the CPU.
pub fn refine(
    vae: &Vae,
    seqs: &Sentences,
    mu: &Tensor,
    steps: usize,
    batch_size: usize,
    device: Device,
) -> Result<Tensor> {
    let mut refined = mu.copy();
    if steps == 0 {
        return Ok(refined);
    }
    eprintln!(
        "refining the codes of {} sentences ({steps} gradient steps each)",
        seqs.len()
    );
    // Each batch keeps its output layer's softmax for the backward pass, [tokens, V]: capped so
    // that a decoding batch of 1,024 long sentences does not hold gigabytes.
    for (idx, batch) in sorted_batches(seqs, batch_size.min(REFINE_BATCH), device) {
        let at = positions(&idx);
        // The batch's codes as the only variables of a store of their own, so that the
        // training optimiser steps them and nothing of the model.
        let vs = nn::VarStore::new(device);
        let z = vs
            .root()
            .var_copy("z", &mu.index_select(0, &at).to_device(device)); // [B, Z]
        let mut adam = Adam::new(&vs);
        let ctl = StepControl::plain(device);
        for _ in 0..steps {
            // Sentences are independent, so the sum's gradient is each sentence's own.
            let loss = map_loss(vae, &batch, &z).sum(Kind::Float);
            let grads = adam
                .gradients(&loss)
                .context("the gradient of a sentence's code")?;
            adam.step(&grads, REFINE_LR, &ctl)?;
        }
        let _ = refined.index_copy_(0, &at, &z.detach().to_device(Device::Cpu));
    }
    Ok(refined)
}

/// The posterior means of `seqs`, refined by `steps` (`refine`), and their log-variances, as
/// the encoder gave them: ([N, Z], [N, Z]) on the CPU, in input order.
pub fn codes(
    vae: &Vae,
    seqs: &Sentences,
    steps: usize,
    batch_size: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let (mu, logvar) = encode(vae, seqs, batch_size, device);
    Ok((refine(vae, seqs, &mu, steps, batch_size, device)?, logvar))
}

/// What `refine` lowers: -log p(x|z) - log N(z; 0, I) of each sentence of `batch` under its
/// code z [B, Z]: [B].
fn map_loss(vae: &Vae, batch: &Batch, z: &Tensor) -> Tensor {
    let hidden = vae.decoder.hidden(&batch.inputs, z, false); // [B, T, H]
    let rows = Some(TRAIN_ROWS_PER_PASS);
    let rec = reconstruction_nll(
        &vae.decoder,
        &hidden,
        &batch.targets,
        &batch.real,
        z,
        rows,
        Kind::Float,
    );
    rec - standard_log_prob(z)
}

/// `refine`'s objective for every sentence of `seqs` under codes `z` [N, Z] (input order): [N]
/// on the CPU.
pub fn map_objective(
    vae: &Vae,
    seqs: &Sentences,
    z: &Tensor,
    batch_size: usize,
    device: Device,
) -> Tensor {
    tch::no_grad(|| {
        let mut out = Tensor::zeros([seqs.len() as i64], (Kind::Float, Device::Cpu));
        for (idx, batch) in sorted_batches(seqs, batch_size, device) {
            let at = positions(&idx);
            let zb = z.index_select(0, &at).to_device(device);
            let _ = out.index_copy_(0, &at, &map_loss(vae, &batch, &zb).to_device(Device::Cpu));
        }
        out
    })
}

/// Row numbers `idx` as an index tensor [len] (on the CPU, where the codes are gathered).
fn positions(idx: &[usize]) -> Tensor {
    Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>())
}

/// Sentences tokenized for encoding, and the warnings about them a user should see.
pub struct Inputs {
    pub seqs: Sentences,
    pub warnings: Vec<String>,
}

/// Tokenizes input sentences for the encoder. Blank lines were already skipped (and counted) by
/// the corpus reader. A sentence made only of unknown words is encoded all the same (as
/// `<unk>`s), and one longer than the model's training `max_len` is encoded in full (the
/// convolutional encoder takes any length); both are reported, by line number.
pub fn prepare_inputs(tok: &TextTokenizer, corpus: &Corpus, max_len: usize) -> Result<Inputs> {
    let mut seqs = Sentences::default();
    let (mut unknown, mut long) = (Vec::new(), Vec::new());
    tok.encode_each(&corpus.lines, |i, ids| {
        let number = corpus.line_numbers[i];
        if ids.iter().all(|&t| i64::from(t) == UNK) {
            unknown.push(number);
        }
        if ids.len() > max_len {
            long.push(number);
        }
        seqs.push(&ids);
    })?;
    let mut warnings = Vec::new();
    if corpus.blank_skipped > 0 {
        warnings.push(format!("skipped {} blank lines", corpus.blank_skipped));
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "{} sentences made only of tokens unknown to the model, encoded as <unk> ({})",
            unknown.len(),
            line_list(&unknown)
        ));
    }
    if !long.is_empty() {
        warnings.push(format!(
            "{} sentences longer than the {max_len} tokens the model was trained on, encoded in full ({})",
            long.len(),
            line_list(&long)
        ));
    }
    Ok(Inputs { seqs, warnings })
}

/// "line 3" / "lines 3, 6, 31 and 12 more".
fn line_list(numbers: &[usize]) -> String {
    const SHOWN: usize = 8;
    let shown: Vec<String> = numbers.iter().take(SHOWN).map(usize::to_string).collect();
    let more = numbers.len().saturating_sub(SHOWN);
    match (numbers.len(), more) {
        (1, _) => format!("line {}", shown[0]),
        (_, 0) => format!("lines {}", shown.join(", ")),
        _ => format!("lines {} and {more} more", shown.join(", ")),
    }
}

/// Reconstruction quality against the inputs: token accuracy (position-wise over each input's
/// tokens and its `</s>`), the share of exact reconstructions, and corpus BLEU-4 over the model's
/// tokens (0-100).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Score {
    pub sentences: usize,
    pub token_accuracy: f64,
    pub exact_match: f64,
    pub bleu: f64,
}

/// Ids of either kind (a corpus's u32, a decoding's i64) as i64, to compare.
fn wide<T: Copy + Into<i64>>(s: &[T]) -> impl Iterator<Item = i64> + '_ {
    s.iter().map(|&i| i.into())
}

/// Scores (input, reconstruction) pairs of token ids.
pub fn score<A, B>(pairs: &[(&[A], &[B])]) -> Score
where
    A: Copy + Into<i64>,
    B: Copy + Into<i64>,
{
    let (mut right, mut total, mut exact) = (0usize, 0usize, 0usize);
    for (input, output) in pairs {
        let x: Vec<i64> = wide(input).chain([EOS]).collect();
        let y: Vec<i64> = wide(output).chain([EOS]).collect();
        right += x.iter().zip(&y).filter(|(a, b)| a == b).count();
        total += x.len();
        exact += usize::from(x == y);
    }
    let n = pairs.len();
    Score {
        sentences: n,
        token_accuracy: if total == 0 {
            0.0
        } else {
            right as f64 / total as f64
        },
        exact_match: if n == 0 { 0.0 } else { exact as f64 / n as f64 },
        bleu: corpus_bleu(pairs, 4),
    }
}

/// Corpus BLEU (Papineni et al. 2002) of hypotheses against one reference each, as
/// `(reference, hypothesis)` pairs: clipped n-gram precisions for n = 1..=max_n summed over the
/// corpus, their geometric mean, times the brevity penalty exp(1 - r / c) when the hypotheses
/// are shorter in total. 0-100; 0 when some order has no match (no smoothing, as sacrebleu's
/// default corpus score).
pub fn corpus_bleu<A, B>(pairs: &[(&[A], &[B])], max_n: usize) -> f64
where
    A: Copy + Into<i64>,
    B: Copy + Into<i64>,
{
    use std::collections::HashMap;
    let (mut matches, mut counts) = (vec![0usize; max_n], vec![0usize; max_n]);
    let (mut ref_len, mut hyp_len) = (0usize, 0usize);
    for (reference, hypothesis) in pairs {
        let (reference, hypothesis): (Vec<i64>, Vec<i64>) =
            (wide(reference).collect(), wide(hypothesis).collect());
        ref_len += reference.len();
        hyp_len += hypothesis.len();
        for n in 1..=max_n {
            let grams = |s: &[i64]| {
                let mut m: HashMap<Vec<i64>, usize> = HashMap::new();
                for w in s.windows(n) {
                    *m.entry(w.to_vec()).or_default() += 1;
                }
                m
            };
            let r = grams(&reference);
            for (g, c) in grams(&hypothesis) {
                matches[n - 1] += c.min(r.get(&g).copied().unwrap_or(0));
                counts[n - 1] += c;
            }
        }
    }
    if hyp_len == 0 || matches.iter().zip(&counts).any(|(&m, &c)| m == 0 || c == 0) {
        return 0.0;
    }
    let log_precision = matches
        .iter()
        .zip(&counts)
        .map(|(&m, &c)| (m as f64 / c as f64).ln())
        .sum::<f64>()
        / max_n as f64;
    let brevity = if hyp_len < ref_len {
        1.0 - ref_len as f64 / hyp_len as f64
    } else {
        0.0
    };
    100.0 * (log_precision + brevity).exp()
}

/// Reconstructs `seqs` as `textvae reconstruct` does by default (z = the posterior mean, decoded
/// with `decoding` in chunks of `batch_size`) and scores the result against them.
pub fn reconstruction_score(
    vae: &Vae,
    seqs: &Sentences,
    decoding: &Decoding,
    batch_size: usize,
    device: Device,
) -> Result<Score> {
    let (mu, _) = encode(vae, seqs, batch_size, device);
    let outputs = decode_ids(vae, &mu.to_device(device), decoding, batch_size)?;
    let pairs: Vec<(&[u32], &[i64])> = seqs
        .iter()
        .zip(&outputs)
        .map(|(x, y)| (x, y.as_slice()))
        .collect();
    Ok(score(&pairs))
}

/// Rows of a [N, Z] tensor as vectors.
pub fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Vec::<Vec<f64>>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu))
        .context("copying latent vectors to the host")
}

/// Vectors back into a [N, Z] float tensor on `device`.
pub fn to_tensor(vs: &[Vec<f64>], device: Device) -> Tensor {
    let z = vs.first().map_or(0, Vec::len) as i64;
    let flat: Vec<f32> = vs.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_slice(&flat)
        .view([vs.len() as i64, z])
        .to_device(device) // [N, Z]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    #[test]
    fn both_methods_hit_both_endpoints_exactly() {
        let a = [0.3, -1.2, 2.5, 0.0];
        let b = [-0.7, 0.4, 1.1, 3.3];
        for m in [Method::Lerp, Method::Slerp] {
            let p = path(&a, &b, 5, m).unwrap();
            assert_eq!(p.len(), 7);
            assert_eq!(p[0], a.to_vec(), "{m:?} start");
            assert_eq!(p[6], b.to_vec(), "{m:?} end");
        }
    }

    #[test]
    fn slerp_keeps_the_norm_between_equal_norm_endpoints() {
        let a = [3.0, 4.0, 0.0];
        let b = [0.0, 0.0, 5.0];
        for i in 0..=10 {
            let p = slerp(&a, &b, i as f64 / 10.0);
            assert!((norm(&p) - 5.0).abs() < 1e-9, "t={i}/10: {}", norm(&p));
        }
        // lerp cuts the corner.
        assert!(norm(&lerp(&a, &b, 0.5)) < 4.0);
    }

    #[test]
    fn slerp_of_parallel_or_zero_vectors_is_finite() {
        let a = [1.0, 2.0, 3.0];
        let b = [2.0, 4.0, 6.0];
        let c = [1.0, 2.0, 3.0000000001];
        let zero = [0.0, 0.0, 0.0];
        for (x, y) in [(&a, &b), (&a, &a), (&a, &c), (&a, &zero), (&zero, &zero)] {
            for t in [0.0, 0.3, 1.0] {
                let p = slerp(x, y, t);
                assert!(p.iter().all(|v| v.is_finite()), "{x:?} {y:?} {t}: {p:?}");
            }
        }
        assert_eq!(slerp(&a, &b, 0.5), lerp(&a, &b, 0.5));
    }

    #[test]
    fn score_counts_positions_and_exact_matches() {
        let a: &[i64] = &[5, 6, 7];
        let b: &[i64] = &[5, 9, 7];
        let c: &[i64] = &[5, 6];
        // a vs a: 4/4 exact; a vs b: 3/4; a vs c: [5,6,7,</s>] vs [5,6,</s>]: 2/4.
        let s = score(&[(a, a), (a, b), (a, c)]);
        assert_eq!(s.sentences, 3);
        assert!((s.token_accuracy - 9.0 / 12.0).abs() < 1e-12);
        assert!((s.exact_match - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(score::<i64, i64>(&[]).token_accuracy, 0.0);
    }

    #[test]
    fn bleu_of_the_paper_arithmetic() {
        let r: &[i64] = &[1, 2, 3, 4, 5, 6];
        assert!((corpus_bleu(&[(r, r)], 4) - 100.0).abs() < 1e-9);
        // One substitution in the middle of 6 tokens: precisions 5/6, 3/5, 1/4, 0/3 -> 0.
        let h: &[i64] = &[1, 2, 3, 9, 5, 6];
        assert_eq!(corpus_bleu(&[(r, h)], 4), 0.0);
        // Bigram BLEU of the same: sqrt(5/6 * 3/5) = sqrt(0.5).
        assert!((corpus_bleu(&[(r, h)], 2) - 100.0 * 0.5f64.sqrt()).abs() < 1e-9);
        // Clipping: "2 2 2" against "1 2 3" matches one 2, not three.
        let (a, b): (&[i64], &[i64]) = (&[1, 2, 3], &[2, 2, 2]);
        assert!((corpus_bleu(&[(a, b)], 1) - 100.0 / 3.0).abs() < 1e-9);
        // Brevity: a correct prefix of 3 of 6 tokens has precision 1 and BP exp(1 - 2).
        let short: &[i64] = &[1, 2, 3];
        assert!((corpus_bleu(&[(r, short)], 2) - 100.0 * (-1f64).exp()).abs() < 1e-9);
        // Corpus-level: counts add up over sentences before the ratio is taken.
        let s = score(&[(r, r), (r, h)]);
        assert!(s.bleu > 0.0 && s.bleu < 100.0, "{}", s.bleu);
    }

    #[test]
    fn line_lists_stay_short() {
        assert_eq!(line_list(&[3]), "line 3");
        assert_eq!(line_list(&[3, 6]), "lines 3, 6");
        let many: Vec<usize> = (1..=20).collect();
        assert_eq!(line_list(&many), "lines 1, 2, 3, 4, 5, 6, 7, 8 and 12 more");
    }

    fn texts(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn a_walk_shows_each_sentence_met_once_in_order() {
        let walk = texts("a a b b b c a a d");
        assert_eq!(spread_over_sentences(&walk, 10), texts("a b c a d"));
        assert_eq!(spread_over_sentences(&walk, 5), texts("a b c a d"));
        assert_eq!(spread_over_sentences(&texts("a a a"), 4), texts("a"));
        // Spread over 8 sentences, 4 lines take the 1st, 3rd, 6th and 8th: a, a, e, g.
        let back = texts("a b a c d e f g");
        assert_eq!(spread_over_sentences(&back, 4), texts("a e g"));
    }

    #[test]
    fn more_sentences_than_lines_are_spread_with_both_ends_kept() {
        let walk: Vec<String> = (0..20)
            .flat_map(|i| [i.to_string(), i.to_string()])
            .collect();
        let shown = spread_over_sentences(&walk, 6);
        assert_eq!(shown, texts("0 4 8 11 15 19"));
        for n in 2..20 {
            let shown = spread_over_sentences(&walk, n);
            assert_eq!(shown.len(), n);
            assert_eq!((shown[0].as_str(), shown[n - 1].as_str()), ("0", "19"));
            let idx: Vec<usize> = shown.iter().map(|s| s.parse().unwrap()).collect();
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "{n}: {idx:?}");
        }
    }

    #[test]
    fn dense_walks_are_finer_but_bounded() {
        assert_eq!(dense_steps(8), 143);
        assert_eq!(dense_steps(1), 31);
        assert_eq!(dense_steps(1000), MAX_DENSE_POINTS - 2);
        assert_eq!(dense_steps(10_000), 10_000);
    }

    #[test]
    fn zero_steps_is_an_error() {
        assert!(path(&[1.0], &[2.0], 0, Method::Lerp)
            .unwrap_err()
            .to_string()
            .contains("--steps"));
    }
}
