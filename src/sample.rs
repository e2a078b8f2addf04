//! Decoding sentences from latent codes: z from the prior N(0, I) (generation) or from any other
//! source, decoded in batches on the model's device under no-grad, with temperature sampling
//! (temperature 0 = argmax).

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::model::Vae;
use crate::tokenizer::{TextTokenizer, BOS, EOS, PAD};

/// How the next token is chosen from the decoder's distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strategy {
    Greedy,
    /// Sample from softmax(logits / temperature).
    Temperature(f64),
}

impl Strategy {
    /// Temperature 0 means argmax; a negative or non-finite one is an error.
    pub fn from_temperature(t: f64) -> Result<Self> {
        ensure!(
            t.is_finite() && t >= 0.0,
            "--temperature must be >= 0, got {t}"
        );
        Ok(if t == 0.0 {
            Strategy::Greedy
        } else {
            Strategy::Temperature(t)
        })
    }

    /// Next tokens [B] from logits [B, V].
    fn choose(&self, logits: &Tensor) -> Tensor {
        match *self {
            Strategy::Greedy => logits.argmax(-1, false),
            Strategy::Temperature(t) => (logits / t)
                .softmax(-1, Kind::Float)
                .multinomial(1, false)
                .squeeze_dim(1),
        }
    }
}

/// Decodes z [B, Z] into token id sequences (without `<s>`/`</s>`), at most `max_len` tokens each.
pub fn decode_z(vae: &Vae, z: &Tensor, strategy: Strategy, max_len: usize) -> Vec<Vec<i64>> {
    tch::no_grad(|| {
        let b = z.size()[0];
        let device = z.device();
        let mut state = vae.decoder.init_state(z);
        let mut tokens = Tensor::full([b], BOS, (Kind::Int64, device));
        let mut finished = Tensor::zeros([b], (Kind::Bool, device));
        let mut steps = Vec::with_capacity(max_len);
        let banned = Tensor::from_slice(&[PAD, BOS]).to_device(device);
        for _ in 0..max_len {
            let (logits, next_state) = vae.decoder.step(&tokens, z, &state);
            state = next_state;
            // <pad> and <s> are never targets; forbid them outright rather than trust training.
            let logits = logits.index_fill(1, &banned, f64::NEG_INFINITY);
            // Finished rows keep emitting padding so that one sync at the end suffices.
            let next = strategy.choose(&logits).masked_fill(&finished, PAD); // [B]
            finished = finished.logical_or(&next.eq(EOS));
            steps.push(next.shallow_clone());
            tokens = next;
            if finished.all().int64_value(&[]) == 1 {
                break;
            }
        }
        if steps.is_empty() {
            return vec![Vec::new(); b as usize];
        }
        let all = Tensor::stack(&steps, 1).to_device(Device::Cpu); // [B, steps]
        let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(all).unwrap_or_default();
        rows.into_iter()
            .map(|r| {
                r.into_iter()
                    .take_while(|&t| t != EOS && t != PAD)
                    .collect()
            })
            .collect()
    })
}

pub struct GenerateOptions {
    pub n: usize,
    pub strategy: Strategy,
    pub max_len: usize,
    pub batch_size: usize,
}

/// `n` sentences decoded from z ~ N(0, I).
pub fn generate(
    vae: &Vae,
    tok: &TextTokenizer,
    device: Device,
    opts: &GenerateOptions,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(opts.n);
    while out.len() < opts.n {
        let b = (opts.n - out.len()).min(opts.batch_size.max(1)) as i64;
        let z = Tensor::randn([b, vae.latent_dim], (Kind::Float, device)); // [B, Z]
        for ids in decode_z(vae, &z, opts.strategy, opts.max_len) {
            out.push(tok.decode(&ids)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_greedy_and_negative_is_rejected() {
        assert_eq!(Strategy::from_temperature(0.0).unwrap(), Strategy::Greedy);
        assert_eq!(
            Strategy::from_temperature(0.8).unwrap(),
            Strategy::Temperature(0.8)
        );
        assert!(Strategy::from_temperature(-1.0).is_err());
        assert!(Strategy::from_temperature(f64::NAN).is_err());
    }

    #[test]
    fn low_temperature_sampling_concentrates_on_the_argmax() {
        tch::manual_seed(0);
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.0])
            .view([1, 4])
            .repeat([200, 1]);
        let picks = Strategy::Temperature(0.05).choose(&logits);
        assert_eq!(picks.eq(1).sum(Kind::Int64).int64_value(&[]), 200);
        assert_eq!(
            Strategy::Greedy
                .choose(&logits)
                .eq(1)
                .sum(Kind::Int64)
                .int64_value(&[]),
            200
        );
    }
}
