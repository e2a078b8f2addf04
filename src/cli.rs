//! The command line: one clap `Args` struct per subcommand and the function that runs it. Flags
//! that tune the model or training are `Option`s laid over the config structs' defaults, so the
//! defaults live in one place (`config.rs`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::checkpoint;
use crate::codes::{self, EncodeFormat, Field};
use crate::config::{
    DropoutMask, KlSchedule, LrSchedule, ModelConfig, Precision, Preset, Recipe, Selection,
    TrainConfig,
};
use crate::data::{self, Corpus};
use crate::eval;
use crate::latent::{self, Method, Spread};
use crate::model::Vae;
use crate::plot;
use crate::prior::Prior;
use crate::progress::Progress;
use crate::runtime;
use crate::sample::{self, Decoding, GenerateOptions, Strategy};
use crate::tokenizer::{TextTokenizer, TokenizerSpec};
use crate::train::{self, StopReason, TrainRequest};
use serde_json::json;
use tch::Device;

#[derive(Parser, Debug)]
#[command(
    name = "textvae",
    version,
    about = "Sentence variational autoencoder: train on your sentences, sample new ones"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model on a file of sentences (one per line).
    Train(Box<TrainArgs>),
    /// Sample sentences from the prior of a trained model.
    Generate(GenerateArgs),
    /// Encode sentences and decode them again, to see what z keeps.
    Reconstruct(ReconstructArgs),
    /// Decode the path between two sentences' latent codes.
    Interpolate(InterpolateArgs),
    /// Write each sentence's posterior mean and log-variance, for use elsewhere.
    Encode(EncodeArgs),
    /// Decode latent codes into sentences: encode's output, or vectors of your own.
    Decode(DecodeCodesArgs),
    /// Evaluate a model on sentences: ELBO, importance-weighted NLL, perplexity, MI, active units.
    Eval(EvalArgs),
    /// Fit a model's prior to sentences' posteriors (training does this when it ends), or set it
    /// back to N(0, I).
    FitPrior(FitPriorArgs),
    /// Draw a model's training curves (reconstruction, KL, beta, validation ELBO) as a PNG.
    Plot(PlotArgs),
    /// Build a tokenizer alone and save it as JSON.
    Vocab(VocabArgs),
    /// Print versions, CUDA availability, the device `auto` picks and the thread count.
    Info(InfoArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScheduleKind {
    Linear,
    Logistic,
    Cyclical,
    Constant,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Training corpus: UTF-8, one sentence per line.
    pub corpus: PathBuf,
    /// Validation corpus; default: a seeded held-out share of CORPUS.
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Checkpoint directory [default: checkpoints/<corpus name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Starting configuration; the flags below override it (`ptb`, `ptb-wide`: see README,
    /// Penn Treebank benchmark).
    #[arg(long, value_enum, default_value = "default")]
    pub preset: Preset,
    /// `word`, `bpe`, or a saved tokenizer .json [default: bpe; word with --preset ptb].
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Vocabulary size [default: 4000 for bpe, 20000 for word].
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Continue the run in the checkpoint directory.
    #[arg(long)]
    pub resume: bool,
    /// Replace a model already in the checkpoint directory.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Epochs to train; with --max-minutes, whichever ends first [default: 100].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Wall-clock budget of the run in minutes; whichever of this and --epochs comes first stops
    /// training. A resumed run counts the minutes its earlier parts trained.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Sentences per training step; on a GPU take 128 or more (README, Performance) [default:
    /// 32; 64 with --preset ptb].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Adam's learning rate [default: 2e-3; 4e-3 with --preset ptb].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Gradients are scaled down to this global norm [default: 5].
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Sentences longer than this many tokens are skipped (and counted) [default: 64; 100 with
    /// --preset ptb].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Share held out for validation when --valid is not given [default: 0.05].
    #[arg(long)]
    pub valid_share: Option<f64>,
    /// Seed of the validation split, the batches and every random draw [default: 1234].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Probability that a decoder input word becomes <unk> while training [default: 0.3; 0 with
    /// --preset ptb].
    #[arg(long)]
    pub word_dropout: Option<f64>,
    /// Free bits per latent dimension in nats (0 = off): dimensions whose batch-mean KL is
    /// below this cost nothing, so each may hold that much information for free [default: 0;
    /// 0.15 with --preset ptb].
    #[arg(long)]
    pub free_bits: Option<f64>,
    /// The rate z should hold, in nats per sentence (0 = off): the KL term becomes
    /// max(R, batch-mean KL), so up to R nats of information cost nothing and beyond R cost as in
    /// the ELBO (a minimum desired rate, Pelsmaeker & Aziz 2020). More rate: better
    /// reconstruction and interpolation, at some cost in NLL (README: the rate table). What a
    /// rate keeps depends on how much a sentence says: 18 nats keep half the tokens of short
    /// everyday English (held-out NLL 31 nats), 0.39-0.41 of Chinese (38; 24 nats keep 0.445
    /// there, README: choosing the rate on Chinese), 0.28 of short Bible sentences (46)
    /// [default: 18; 0 with --preset ptb].
    #[arg(long)]
    pub target_kl: Option<f64>,
    /// Decoupled weight decay on the encoder's own weights (AdamW): each step takes lr times
    /// this share off them, so directions the objective barely constrains do not drift. Keeps
    /// free bits' validation KL from running away late in a run (README: the run-away)
    /// [default: 0; 0.1 with --preset ptb].
    #[arg(long, allow_negative_numbers = true)]
    pub encoder_weight_decay: Option<f64>,
    /// Decoupled weight decay on every weight (AdamW): each step takes lr times this share off
    /// them; the encoder's own weights take the larger of this and --encoder-weight-decay.
    /// It narrows the gap between training and unseen sentences (README: why the defaults)
    /// [default: 0.05; 0 with --preset ptb].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (Polyak averaging,
    /// e.g. 0.999; 0 = off): validation judges the average and model.safetensors keeps it,
    /// while training goes on from the weights themselves [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub ema_decay: Option<f64>,
    /// Weight of a bag-of-words loss predicting the sentence's words from z (Zhao et al. 2017;
    /// 0 = off): it makes z carry what the sentence says from the first step. Training only;
    /// the saved model does not use it.
    #[arg(long)]
    pub bow_weight: Option<f64>,
    /// When the run ends, fit the prior p(z) to the training sentences' posteriors as a mixture
    /// of this many Gaussians (ex-post density estimation, Ghosh et al. 2020), stored with the
    /// kept weights: `generate` samples where sentences' codes live and `eval`'s NLL and KL use
    /// it. 0 keeps N(0, I). Training's objective and --target-kl use N(0, I) either way
    /// [default: 1000].
    #[arg(long)]
    pub prior_components: Option<usize>,
    /// Autoencoder pretraining (Li et al. 2019): this many steps at beta 0, then the decoder is
    /// re-initialised and the KL schedule begins (0 = off).
    #[arg(long)]
    pub ae_steps: Option<u64>,
    /// Which weights model.safetensors keeps, judged on the validation sentences every epoch:
    /// `objective` (the training objective at the final beta), `elbo` (at beta 1, whatever the
    /// objective), `nll` (importance-weighted, K = 20, up to 500 sentences) or `last`
    /// [default: objective].
    #[arg(long, value_enum)]
    pub select: Option<Selection>,
    /// KL annealing schedule.
    #[arg(long, value_enum)]
    pub kl_schedule: Option<ScheduleKind>,
    /// Linear: steps from --kl-start to 1. Cyclical: steps per cycle.
    #[arg(long)]
    pub kl_steps: Option<u64>,
    /// Linear and cyclical: beta at the start of the ramp.
    #[arg(long)]
    pub kl_start: Option<f64>,
    /// Logistic: slope k.
    #[arg(long)]
    pub kl_k: Option<f64>,
    /// Logistic: midpoint step x0.
    #[arg(long)]
    pub kl_x0: Option<f64>,
    /// Cyclical: share of each cycle spent rising.
    #[arg(long)]
    pub kl_ratio: Option<f64>,
    /// Constant: the beta.
    #[arg(long)]
    pub beta: Option<f64>,
    /// Token embedding size [default: 256].
    #[arg(long)]
    pub emb_dim: Option<i64>,
    /// Decoder LSTM hidden size [default: 256].
    #[arg(long)]
    pub hidden_dim: Option<i64>,
    /// Dimensions of z [default: 32].
    #[arg(long)]
    pub latent_dim: Option<i64>,
    /// Decoder LSTM layers [default: 1].
    #[arg(long)]
    pub num_layers: Option<i64>,
    /// Encoder convolution filters per width [default: 128].
    #[arg(long)]
    pub conv_filters: Option<i64>,
    /// Encoder convolution widths, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub kernel_widths: Option<Vec<i64>>,
    /// Dropout on the decoder's input embeddings [default: 0.1; 0.3 with --preset ptb].
    #[arg(long)]
    pub emb_dropout: Option<f64>,
    /// Dropout on the decoder's LSTM output [default: 0.1; 0.3 with --preset ptb].
    #[arg(long)]
    pub out_dropout: Option<f64>,
    /// DropConnect on the decoder LSTM's recurrent (hidden-to-hidden) weights, training only
    /// (Merity et al. 2017's weight drop): each step zeroes this share of them, one mask for the
    /// whole batch and every time step. Regularises what the two dropouts above cannot reach;
    /// on a GPU the LSTM then runs on weights cuDNN copies each step [default: 0].
    #[arg(long)]
    pub weight_drop: Option<f64>,
    /// Dropout between stacked decoder LSTM layers (with --num-layers 2 or more), training
    /// only; like --weight-drop it runs the LSTM on weights gathered per step (on a GPU, copied
    /// by cuDNN each step) [default: 0].
    #[arg(long)]
    pub layer_dropout: Option<f64>,
    /// How --emb-dropout and --out-dropout draw their masks: `token`, fresh at every position,
    /// or `sentence`, one mask per sentence shared by every time step (Gal & Ghahramani 2016's
    /// variational dropout) [default: token].
    #[arg(long, value_enum)]
    pub dropout_mask: Option<DropoutMask>,
    /// Dropout on the encoder's pooled features before mu and logvar, training only (Kim
    /// 2014) [default: 0].
    #[arg(long)]
    pub enc_dropout: Option<f64>,
    /// Share the decoder's embedding matrix with its output projection, which the encoder
    /// then reads too (needs emb = hidden dim) [default: true while --emb-dim equals
    /// --hidden-dim; `--tie-embeddings false` unties].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub tie_embeddings: Option<bool>,
    /// The encoder reads tokens through the decoder's input embeddings instead of its own
    /// [default: true; false with --preset ptb].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub share_embeddings: Option<bool>,
    /// A skip path from z straight to the output logits of every position (Dieng et al. 2019)
    /// [default: true; false with --preset ptb].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub z_skip: Option<bool>,
    /// The skip path enters through the output layer's input (z -> hidden size, scored by
    /// the output embeddings) instead of a logit per word [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_hidden: Option<bool>,
    /// BN-VAE: batch-normalise the posterior means with this fixed scale gamma (0 = off), so
    /// every dimension's means spread across sentences and E[KL] >= latent dim * gamma^2 / 2
    /// (Zhu et al. 2020).
    #[arg(long)]
    pub bn_gamma: Option<f64>,
    /// linear: hold --lr, then decay it linearly to 1e-5 over the last --lr-cooldown of the
    /// run's budget (--max-minutes or --epochs, whichever ends first), so a run of any length
    /// ends annealed; plateau: halve it after --lr-patience epochs without a better --select
    /// criterion [default: linear].
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrSchedule>,
    /// With --lr-schedule linear: the last share of the budget over which the rate decays
    /// (1 = from the first step) [default: 0.25].
    #[arg(long)]
    pub lr_cooldown: Option<f64>,
    /// With --lr-schedule plateau: epochs without improvement of the --select criterion before
    /// the learning rate is halved, counted once beta has settled.
    #[arg(long)]
    pub lr_patience: Option<usize>,
    /// Steps per log line and metrics record; also how often the training losses are read back
    /// from the device (the one wait for it within a window) [default: 50].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// A step whose loss or gradient is NaN or infinite is skipped (and counted); after this
    /// many in a row training stops with an error, keeping the last checkpoint, at the next log
    /// line (--log-every) [default: 20].
    #[arg(long)]
    pub max_nonfinite: Option<u64>,
    /// Minutes between checkpoints within an epoch (0 = at epoch ends only), so that a kill
    /// costs at most this much training; --resume goes on from the batch where it was saved
    /// [default: 10].
    #[arg(long, value_name = "MINUTES")]
    pub save_every: Option<f64>,
    /// The number format of the matrix products in training steps (the encoder's convolutions,
    /// the LSTM except on a GPU, the output layer): bf16 multiplies in bfloat16 with float32
    /// weights, optimiser, softmax and loss (mixed precision); auto takes bf16 on CPUs that
    /// multiply it natively (AVX512-BF16: about 1.7x the tokens/s on PTB, the same validation
    /// ELBO per step) and f32 elsewhere, GPUs included; validation always runs in f32 (`eval
    /// --precision` is eval's own) [default: auto].
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch threads [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

impl TrainArgs {
    /// The preset's tokenizer and configs with every flag given laid over them.
    pub fn configs(&self) -> Result<(TokenizerSpec, ModelConfig, TrainConfig)> {
        let Recipe {
            tokenizer,
            model,
            train,
        } = self.preset.recipe();
        let (m, t) = self.laid_over(model, train);
        let spec = self.tokenizer.as_deref().unwrap_or(tokenizer).parse()?;
        Ok((spec, m, t))
    }

    /// The configs of the run to resume in `dir` with every flag given laid over them, so that
    /// training can tell a flag that changes the run from one that repeats it.
    pub fn resumed_configs(&self, dir: &Path) -> Result<(TokenizerSpec, ModelConfig, TrainConfig)> {
        let saved: checkpoint::CheckpointConfig =
            checkpoint::read_json(&dir.join(checkpoint::CONFIG)).with_context(|| {
                format!("cannot resume: {} has no readable config", dir.display())
            })?;
        let (m, t) = self.laid_over(saved.model, saved.train);
        let spec = self
            .tokenizer
            .as_deref()
            .unwrap_or(&saved.tokenizer)
            .parse()?;
        Ok((spec, m, t))
    }

    fn laid_over(&self, mut m: ModelConfig, mut t: TrainConfig) -> (ModelConfig, TrainConfig) {
        set(&mut m.emb_dim, self.emb_dim);
        set(&mut m.hidden_dim, self.hidden_dim);
        set(&mut m.latent_dim, self.latent_dim);
        set(&mut m.num_layers, self.num_layers);
        set(&mut m.conv_filters, self.conv_filters);
        set(&mut m.kernel_widths, self.kernel_widths.clone());
        set(&mut m.emb_dropout, self.emb_dropout);
        set(&mut m.out_dropout, self.out_dropout);
        set(&mut m.weight_drop, self.weight_drop);
        set(&mut m.layer_dropout, self.layer_dropout);
        set(&mut m.dropout_mask, self.dropout_mask);
        set(&mut m.enc_dropout, self.enc_dropout);
        set(&mut m.tie_embeddings, self.tie_embeddings);
        set(&mut m.bn_gamma, self.bn_gamma);
        set(&mut m.share_embeddings, self.share_embeddings);
        set(&mut m.z_skip, self.z_skip);
        set(&mut m.skip_hidden, self.skip_hidden);
        set(&mut t.epochs, self.epochs);
        t.max_minutes = self.max_minutes.or(t.max_minutes);
        set(&mut t.batch_size, self.batch_size);
        set(&mut t.lr, self.lr);
        set(&mut t.clip_norm, self.clip_norm);
        set(&mut t.max_len, self.max_len);
        set(&mut t.valid_share, self.valid_share);
        set(&mut t.seed, self.seed);
        set(&mut t.word_dropout, self.word_dropout);
        set(&mut t.free_bits, self.free_bits);
        set(&mut t.target_kl, self.target_kl);
        set(&mut t.bow_weight, self.bow_weight);
        set(&mut t.encoder_weight_decay, self.encoder_weight_decay);
        set(&mut t.weight_decay, self.weight_decay);
        set(&mut t.ema_decay, self.ema_decay);
        set(&mut t.prior_components, self.prior_components);
        set(&mut t.select, self.select);
        set(&mut t.ae_steps, self.ae_steps);
        set(&mut t.log_every, self.log_every);
        set(&mut t.max_nonfinite, self.max_nonfinite);
        set(&mut t.save_every, self.save_every);
        set(&mut t.lr_schedule, self.lr_schedule);
        set(&mut t.lr_cooldown, self.lr_cooldown);
        set(&mut t.lr_patience, self.lr_patience);
        set(&mut t.precision, self.precision);
        t.kl_schedule = self.kl_schedule(t.kl_schedule);
        // Tying by default must not turn a change of one width into an error: the default
        // unties when the widths differ, an explicit --tie-embeddings is checked.
        if self.tie_embeddings.is_none() && m.emb_dim != m.hidden_dim {
            m.tie_embeddings = false;
        }
        (m, t)
    }

    fn kl_schedule(&self, default: KlSchedule) -> KlSchedule {
        let kind = match (self.kl_schedule, &default) {
            (Some(k), _) => k,
            (None, KlSchedule::Linear { .. }) => ScheduleKind::Linear,
            (None, KlSchedule::Logistic { .. }) => ScheduleKind::Logistic,
            (None, KlSchedule::Cyclical { .. }) => ScheduleKind::Cyclical,
            (None, KlSchedule::Constant { .. }) => ScheduleKind::Constant,
        };
        let (d_start, d_steps) = match default {
            KlSchedule::Linear { start, steps } => (start, steps),
            KlSchedule::Cyclical { start, period, .. } => (start, period),
            _ => (0.0, 2000),
        };
        let start = self.kl_start.unwrap_or(d_start);
        let steps = self.kl_steps.unwrap_or(d_steps);
        match kind {
            ScheduleKind::Linear => KlSchedule::Linear { start, steps },
            ScheduleKind::Cyclical => KlSchedule::Cyclical {
                period: steps,
                ratio: self.kl_ratio.unwrap_or(0.5),
                start,
            },
            ScheduleKind::Logistic => KlSchedule::Logistic {
                k: self.kl_k.unwrap_or(0.0025),
                x0: self.kl_x0.unwrap_or(2500.0),
            },
            ScheduleKind::Constant => KlSchedule::Constant {
                beta: self.beta.unwrap_or(1.0),
            },
        }
    }
}

/// Which model to load and how to run it: shared by every command that reads a checkpoint.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Checkpoint directory [default: the latest trained model].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Seed for reproducible output [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch threads [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// Seeds, sets threads, and loads the checkpoint on the chosen device.
    pub fn load(&self) -> Result<(checkpoint::Loaded, Device)> {
        let device = runtime::parse_device(&self.device)?;
        runtime::setup(Some(self.seed.unwrap_or_else(rand::random)), self.threads)?;
        let dir = checkpoint::resolve(self.checkpoint.as_deref())?;
        Ok((checkpoint::load(&dir, device)?, device))
    }
}

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Checkpoint directory [default: the latest trained model].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Output PNG [default: curves.png in the checkpoint directory].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// Bounds on sizes a user gives, checked before anything is allocated: far past any use, short
/// of what takes the machine's memory.
const MAX_DECODE_BATCH: usize = 65_536;
const MAX_BEAM: usize = 1_000;
const MAX_STEPS: usize = 100_000;
const MAX_IW_SAMPLES: usize = 100_000;

/// `--batch-size` of decoding and evaluation: sentences at once, within MAX_DECODE_BATCH.
fn check_batch_size(n: usize) -> Result<()> {
    anyhow::ensure!(
        (1..=MAX_DECODE_BATCH).contains(&n),
        "--batch-size must be in 1..={MAX_DECODE_BATCH}, got {n}"
    );
    Ok(())
}

/// How sentences are decoded from z: shared by generate, reconstruct, interpolate and decode.
#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    /// Sampling temperature; 0 = argmax [default: 1 for generate; reconstruct, interpolate and
    /// decode are greedy unless a sampling flag is given].
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probability adds up to P (nucleus).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Always take the most likely token.
    #[arg(long)]
    pub greedy: bool,
    /// Beam search with K beams (log-probability per token decides).
    #[arg(long)]
    pub beam: Option<usize>,
    /// Maximum tokens per sentence [default: the model's training --max-len].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Never repeat an n-gram of this size within a sentence; 0 = off [default: 4 for greedy
    /// and beam decoding, which otherwise fall into loops; 0 for sampling].
    #[arg(long)]
    pub no_repeat_ngram: Option<usize>,
    /// Sentences decoded at once (one batch of the decoder).
    #[arg(long, default_value_t = sample::DECODE_BATCH)]
    pub batch_size: usize,
}

impl DecodeArgs {
    /// The strategy asked for; with no sampling flag, `sample_by_default` picks temperature 1
    /// sampling (generate) over greedy decoding (reconstruct, interpolate, decode).
    pub fn strategy(&self, sample_by_default: bool) -> Result<Strategy> {
        let sampling_asked =
            self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some();
        let greedy = self.greedy || (!sample_by_default && !sampling_asked && self.beam.is_none());
        Strategy::from_flags(
            self.temperature.unwrap_or(1.0),
            self.top_k,
            self.top_p,
            greedy,
            self.beam,
        )
    }

    pub fn validate(&self) -> Result<()> {
        check_batch_size(self.batch_size)?;
        anyhow::ensure!(
            self.beam.is_none_or(|k| k <= MAX_BEAM),
            "--beam must be at most {MAX_BEAM}"
        );
        anyhow::ensure!(self.max_len != Some(0), "--max-len must be positive");
        anyhow::ensure!(
            self.max_len.is_none_or(|m| m <= sample::MAX_DECODE_LEN),
            "--max-len must be at most {} tokens",
            sample::MAX_DECODE_LEN
        );
        Ok(())
    }

    /// The whole decoding recipe for `model`.
    pub fn decoding(&self, strategy: Strategy, model: &checkpoint::Loaded) -> Decoding {
        let d = model.decoding(strategy, self.max_len.unwrap_or(model.config.train.max_len));
        Decoding {
            no_repeat_ngram: self.no_repeat_ngram.unwrap_or(d.no_repeat_ngram),
            ..d
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Number of sentences.
    #[arg(short = 'n', long = "num", default_value_t = 10)]
    pub n: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

#[derive(clap::Args, Debug)]
pub struct ReconstructArgs {
    /// Sentences, one per line; `-` or nothing reads standard input.
    pub input: Option<PathBuf>,
    /// Draw z from q(z|x) instead of taking its mean.
    #[arg(long)]
    pub sample: bool,
    /// Reconstructions per input sentence, each input's on adjacent lines: they differ with
    /// --sample or a sampling flag, so more than one needs either.
    #[arg(long, default_value_t = 1)]
    pub num: usize,
    /// Refine each code by this many gradient steps on -log p(x|z) - log N(z; 0, I) before
    /// decoding, from the posterior mean towards the z the decoder finds most likely for the
    /// sentence (0 = the encoder's mean as it is; 30 is enough on short sentences).
    #[arg(long, default_value_t = 0, conflicts_with = "sample")]
    pub refine: usize,
    /// JSON lines instead of `input<TAB>reconstruction`.
    #[arg(long)]
    pub json: bool,
    /// Report token accuracy and exact-match rate against the inputs (on stderr).
    #[arg(long)]
    pub score: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

#[derive(clap::Args, Debug)]
pub struct InterpolateArgs {
    /// The sentence to start from.
    #[arg(required_unless_present_any = ["prior", "pairs"])]
    pub a: Option<String>,
    /// The sentence to end at.
    #[arg(required_unless_present_any = ["prior", "pairs"])]
    pub b: Option<String>,
    /// Points between the two ends: steps + 2 lines are printed (fewer with `--spread sentences`
    /// where the path meets fewer sentences).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    #[arg(long, value_enum, default_value = "lerp")]
    pub method: Method,
    /// Where the lines come from: a sentence that holds a long stretch of the path fills one line
    /// with `sentences`, several with `even` [default: sentences; even when sampling].
    #[arg(long, value_enum)]
    pub spread: Option<Spread>,
    /// Refine each end's code by this many gradient steps, as `reconstruct --refine` does.
    #[arg(long, default_value_t = 0, conflicts_with = "prior")]
    pub refine: usize,
    /// Walk between two random samples of the prior instead of two sentences.
    #[arg(long, conflicts_with_all = ["a", "b", "pairs"])]
    pub prior: bool,
    /// A file of `A<TAB>B` pairs; the walks are printed one after another, separated by a blank line.
    #[arg(long, conflicts_with_all = ["a", "b"])]
    pub pairs: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

#[derive(clap::Args, Debug)]
pub struct EncodeArgs {
    /// Sentences, one per line; `-` or nothing reads standard input.
    pub input: Option<PathBuf>,
    /// jsonl: {"line", "text", "mu", "logvar"} per sentence; tsv: text, mu, logvar (numbers
    /// space-separated); npy: a float32 array [N, 2, Z] with mu at [:, 0] and logvar at [:, 1]
    /// (with --refine, the refined z as well).
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: EncodeFormat,
    /// Output file [default: standard output; required for npy].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Also give each sentence's code refined by this many gradient steps, as `reconstruct
    /// --refine` does: the z the decoder finds most likely for it under the prior, which
    /// reconstructs it more often than mu (jsonl: a "z" field; tsv: a fourth column; npy:
    /// [N, 3, Z] with z at [:, 2]); 0 = none.
    #[arg(long, default_value_t = 0)]
    pub refine: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(clap::Args, Debug)]
pub struct DecodeCodesArgs {
    /// Codes, one per sentence to decode: an npy float array [N, Z] or encode's [N, 2 or 3, Z]
    /// (known by its content, whatever the file's name); or text, one code per line — encode's
    /// jsonl or tsv, a JSON array, or the numbers separated by spaces or commas (blank lines are
    /// skipped). `-` or nothing reads standard input. Sentences come out in the same order, one
    /// per line.
    pub input: Option<PathBuf>,
    /// Which of encode's vectors to decode; a bare vector is decoded as it is.
    #[arg(long, value_enum, default_value = "mu")]
    pub field: Field,
    /// Sentences per code, each code's on adjacent lines: samples of p(x|z), so it needs a
    /// sampling flag (--temperature, --top-k or --top-p); greedy and beam decoding give one
    /// sentence per code.
    #[arg(short = 'n', long = "num", default_value_t = 1)]
    pub num: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Sentences to evaluate, one per line (e.g. the checkpoint's heldout.txt).
    pub file: PathBuf,
    /// Importance samples per sentence for the NLL (the literature reports K = 500).
    #[arg(long, default_value_t = 500)]
    pub iw_samples: usize,
    /// Sentences per batch; the K samples of a batch are scored in passes sized by memory.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Evaluate this many sentences of FILE, evenly spaced through it, instead of all: the
    /// NLL's cost grows with sentences x K [default: all].
    #[arg(long)]
    pub sentences: Option<usize>,
    /// One JSON object: sentences, tokens, rec, kl, elbo, nll, ppl, mi, au, iw_samples,
    /// iw_precision, rec_decoding, rec_acc, rec_exact, rec_bleu.
    #[arg(long)]
    pub json: bool,
    /// The number format of the LSTM (on a GPU always f32) and the output layer in the NLL's
    /// importance samples, most of eval's time: auto takes bf16 on CPUs that multiply it
    /// natively, as `train --precision` (on PTB, K = 50 over 300 test sentences: the NLL within
    /// the run-to-run spread of f32's, the samples over 2x as fast); the ELBO, KL, MI and
    /// reconstructions are computed in f32 whichever.
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
    /// Never repeat an n-gram of this size in the reconstructions (0 = off), as
    /// `reconstruct --no-repeat-ngram`.
    #[arg(long, default_value_t = sample::DEFAULT_NO_REPEAT_NGRAM)]
    pub no_repeat_ngram: usize,
    /// Score reconstructions by beam search with K beams instead of greedy decoding, as
    /// `reconstruct --beam K --score` (on text without spaces it brings back more); the other
    /// figures do not change.
    #[arg(long)]
    pub beam: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(clap::Args, Debug)]
pub struct FitPriorArgs {
    /// The sentences whose posteriors the prior is fitted to, one per line: the model's training
    /// sentences, not those you will evaluate on.
    pub file: PathBuf,
    /// Gaussians in the mixture; 0 sets the prior back to N(0, I).
    #[arg(long, default_value_t = crate::config::PRIOR_COMPONENTS)]
    pub components: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(clap::Args, Debug)]
pub struct VocabArgs {
    /// Corpus to build the tokenizer from.
    pub corpus: PathBuf,
    /// Output file (e.g. vocab/NAME.json).
    #[arg(short, long)]
    pub output: PathBuf,
    /// `word` or `bpe`.
    #[arg(long, default_value = "bpe")]
    pub tokenizer: String,
    #[arg(long)]
    pub vocab_size: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Whether `err` comes from writing to a reader that has gone (`textvae generate | head -3`):
/// the reader has what it wanted, so `main` ends quietly, as the other producers of a
/// pipeline do, rather than printing an error nobody asked about.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs one subcommand; a libtorch error (out of memory, say) comes back as an error.
pub fn run(cli: Cli) -> Result<()> {
    runtime::catch_torch(|| dispatch(cli))
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => run_train(*a),
        Command::Generate(a) => run_generate(a),
        Command::Reconstruct(a) => run_reconstruct(a),
        Command::Interpolate(a) => run_interpolate(a),
        Command::Encode(a) => run_encode(a),
        Command::Decode(a) => run_decode(a),
        Command::Eval(a) => run_eval(a),
        Command::Plot(a) => run_plot(a),
        Command::FitPrior(a) => run_fit_prior(a),
        Command::Vocab(a) => run_vocab(a),
        Command::Info(a) => run_info(a),
    }
}

fn run_train(a: TrainArgs) -> Result<()> {
    let device = runtime::parse_device(&a.device)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| train::default_out_dir(&a.corpus));
    let (tokenizer, model, train) = if a.resume && out.join(checkpoint::CONFIG).is_file() {
        a.resumed_configs(&out)?
    } else {
        a.configs()?
    };
    let req = TrainRequest {
        corpus: a.corpus.clone(),
        valid: a.valid.clone(),
        out: Some(out),
        tokenizer,
        vocab_size: a.vocab_size,
        model,
        train,
        device,
        resume: a.resume,
        force: a.force,
        poison_steps: Vec::new(),
        stop_at_step: None,
    };
    // Validate before any slow work; vocab_size is filled in from the tokenizer later.
    req.train.validate()?;
    req.model.validate_shape()?;
    runtime::setup(None, a.threads)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C means now.
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let summary = train::run(&req, &stop)?;
    let how = match summary.stopped_by {
        StopReason::Epochs => "all epochs done",
        StopReason::TimeBudget => "time budget spent",
        StopReason::Interrupted => "interrupted",
    };
    println!(
        "{}: {how}; {} epochs, {} steps; validation rec {:.2} kl {:.2} elbo {:.2} nats/sentence, {} active units",
        summary.dir.display(),
        summary.state.epoch,
        summary.state.step,
        summary.valid.rec,
        summary.valid.kl,
        summary.valid.neg_elbo,
        summary.valid.au
    );
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let strategy = a.decode.strategy(true)?;
    a.decode.validate()?;
    let (model, device) = a.model.load()?;
    let opts = GenerateOptions {
        n: a.n,
        decoding: a.decode.decoding(strategy, &model),
        batch_size: a.decode.batch_size,
    };
    let mut out = std::io::stdout().lock();
    sample::generate(&model.vae, &model.tokenizer, device, &opts, |line| {
        writeln!(out, "{line}").context("writing to stdout")
    })
}

/// Sentences from a file, or from standard input for `-` or no path.
fn read_inputs(path: Option<&Path>) -> Result<Corpus> {
    match path {
        Some(p) if p != Path::new("-") => data::read_corpus(p),
        _ => {
            let corpus = data::parse_corpus(std::io::stdin().lock()).context("standard input")?;
            anyhow::ensure!(!corpus.lines.is_empty(), "no sentences on standard input");
            Ok(corpus)
        }
    }
}

/// Encodes input sentences with the model's tokenizer, printing the warnings on stderr.
fn encode_inputs(model: &checkpoint::Loaded, corpus: &Corpus) -> Result<data::Sentences> {
    let inputs = latent::prepare_inputs(&model.tokenizer, corpus, model.config.train.max_len)?;
    for w in &inputs.warnings {
        eprintln!("warning: {w}");
    }
    Ok(inputs.seqs)
}

fn run_reconstruct(a: ReconstructArgs) -> Result<()> {
    let strategy = a.decode.strategy(false)?;
    a.decode.validate()?;
    check_num(a.num, strategy, a.sample, ", or draw the codes (--sample)")?;
    let corpus = read_inputs(a.input.as_deref())?;
    let (model, device) = a.model.load()?;
    let seqs = encode_inputs(&model, &corpus)?;
    let (mu, logvar) = latent::codes(&model.vae, &seqs, a.refine, a.decode.batch_size, device)?;
    let k = a.num as i64;
    // [N*K, Z]: the K rows of a sentence are adjacent.
    let (mu, logvar) = (
        mu.repeat_interleave_self_int(k, 0, None),
        logvar.repeat_interleave_self_int(k, 0, None),
    );
    let z = if a.sample {
        Vae::reparameterize(&mu, &logvar)
    } else {
        mu
    };
    let ids = sample::decode_ids(
        &model.vae,
        &z.to_device(device),
        &a.decode.decoding(strategy, &model),
        a.decode.batch_size,
    )?;
    let mut out = std::io::stdout().lock();
    let mut pairs = Vec::with_capacity(ids.len());
    for (i, line) in corpus.lines.iter().enumerate() {
        let outs = &ids[i * a.num..(i + 1) * a.num];
        let texts = outs
            .iter()
            .map(|o| model.tokenizer.decode(o))
            .collect::<Result<Vec<_>>>()?;
        if a.json {
            writeln!(
                out,
                "{}",
                json!({"line": corpus.line_numbers[i], "input": line, "reconstructions": texts})
            )?;
        } else {
            for t in &texts {
                writeln!(out, "{}\t{}", line.replace('\t', " "), t)?;
            }
        }
        pairs.extend(outs.iter().map(|o| (seqs.get(i), o.as_slice())));
    }
    if a.score {
        let s = latent::score(&pairs);
        eprintln!(
            "score: token accuracy {:.4}, exact match {:.4}, BLEU-4 {:.2} over {} reconstructions of {} sentences",
            s.token_accuracy,
            s.exact_match,
            s.bleu,
            s.sentences,
            corpus.lines.len()
        );
    }
    Ok(())
}

fn run_interpolate(a: InterpolateArgs) -> Result<()> {
    let strategy = a.decode.strategy(false)?;
    a.decode.validate()?;
    anyhow::ensure!(
        (1..=MAX_STEPS).contains(&a.steps),
        "--steps must be in 1..={MAX_STEPS} (the number of points between the two ends), got {}",
        a.steps
    );
    let sampling = matches!(strategy, Strategy::Sample { .. });
    anyhow::ensure!(
        !(sampling && a.spread == Some(Spread::Sentences)),
        "--spread sentences needs greedy or beam decoding: sampled lines differ at every point"
    );
    let spread = a.spread.unwrap_or(if sampling {
        Spread::Even
    } else {
        Spread::Sentences
    });
    let (model, device) = a.model.load()?;
    let ends = walk_ends(&a, &model, device)?;
    let decoded = match spread {
        Spread::Sentences => latent::dense_steps(a.steps),
        Spread::Even => a.steps,
    };
    let decoding = a.decode.decoding(strategy, &model);
    // Walks are decoded a group at a time, so that any number of pairs runs in bounded memory.
    let per_pass = (WALK_POINTS_PER_PASS / (decoded + 2)).max(1);
    let mut out = std::io::stdout().lock();
    for (g, group) in ends.chunks(per_pass).enumerate() {
        let mut points = Vec::new();
        for (za, zb) in group {
            points.extend(latent::path(za, zb, decoded, a.method)?);
        }
        let z = latent::to_tensor(&points, device);
        let texts = model.decode(&z, &decoding, a.decode.batch_size)?;
        for (i, walk) in texts.chunks(decoded + 2).enumerate() {
            if g + i > 0 {
                writeln!(out)?;
            }
            let lines = match spread {
                Spread::Sentences => latent::spread_over_sentences(walk, a.steps + 2),
                Spread::Even => walk.to_vec(),
            };
            for t in lines {
                writeln!(out, "{t}")?;
            }
        }
    }
    Ok(())
}

/// Points of walks decoded in one pass of `interpolate`.
const WALK_POINTS_PER_PASS: usize = 65_536;

/// The two ends of each walk `interpolate` was asked for: the posterior means of the sentences,
/// or two draws from the prior.
fn walk_ends(
    a: &InterpolateArgs,
    model: &checkpoint::Loaded,
    device: Device,
) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
    if a.prior {
        let zd = model.vae.latent_dim;
        let z = latent::rows(&model.vae.prior.sample(2, zd, Device::Cpu)?)?;
        return Ok(vec![(z[0].clone(), z[1].clone())]);
    }
    let pairs: Vec<(String, String)> = match (&a.pairs, &a.a, &a.b) {
        (Some(file), _, _) => read_pairs(file)?,
        (None, Some(x), Some(y)) => vec![(x.clone(), y.clone())],
        _ => Vec::new(),
    };
    let lines: Vec<String> = pairs
        .iter()
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect();
    for (i, l) in lines.iter().enumerate() {
        anyhow::ensure!(
            !l.trim().is_empty(),
            "sentence {} of the interpolation is empty",
            i + 1
        );
    }
    let corpus = Corpus {
        line_numbers: (1..=lines.len()).collect(),
        lines,
        blank_skipped: 0,
    };
    let seqs = encode_inputs(model, &corpus)?;
    let (mu, _) = latent::codes(&model.vae, &seqs, a.refine, a.decode.batch_size, device)?;
    let mu = latent::rows(&mu)?;
    Ok(mu.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect())
}

/// `A<TAB>B` per line; blank lines skipped; anything else is an error naming the line.
fn read_pairs(path: &Path) -> Result<Vec<(String, String)>> {
    let corpus = data::read_corpus(path)?;
    corpus
        .lines
        .iter()
        .zip(&corpus.line_numbers)
        .map(|(l, n)| match l.split_once('\t') {
            Some((x, y)) if !x.trim().is_empty() && !y.trim().is_empty() => {
                Ok((x.trim().to_string(), y.trim().to_string()))
            }
            _ => anyhow::bail!(
                "{} line {n}: expected two sentences separated by a tab",
                path.display()
            ),
        })
        .collect()
}

fn run_fit_prior(a: FitPriorArgs) -> Result<()> {
    anyhow::ensure!(
        a.components <= crate::config::MAX_PRIOR_COMPONENTS,
        "--components must be at most {}, got {}",
        crate::config::MAX_PRIOR_COMPONENTS,
        a.components
    );
    let corpus = read_inputs(Some(&a.file))?;
    let dir = checkpoint::resolve(a.model.checkpoint.as_deref())?;
    // Said before the lock, whose own error would name a lock file the user never made.
    checkpoint::check_dir(&dir)?;
    // A training run in the directory rewrites model.safetensors: the prior must not be fitted
    // to weights it is about to replace.
    let _lock = crate::files::DirLock::acquire(&dir)?;
    let (mut model, _) = a.model.load()?;
    let seqs = encode_inputs(&model, &corpus)?;
    let seed = a.model.seed.unwrap_or(model.config.train.seed);
    let started = std::time::Instant::now();
    let path = dir.join(checkpoint::WEIGHTS);
    let report = train::install_prior(&mut model.vae, &model.vs, &seqs, a.components, seed, &path)?;
    match report {
        Some(r) => println!(
            "{}: {}",
            dir.display(),
            train::prior_message(&r, None, started.elapsed().as_secs_f64())
        ),
        None => println!("{}: the prior is N(0, I)", dir.display()),
    }
    Ok(())
}

fn run_encode(a: EncodeArgs) -> Result<()> {
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be positive");
    if matches!(a.format, EncodeFormat::Npy) && a.output.is_none() {
        anyhow::bail!("--format npy needs -o FILE.npy");
    }
    let corpus = read_inputs(a.input.as_deref())?;
    let (model, device) = a.model.load()?;
    let seqs = encode_inputs(&model, &corpus)?;
    let (mu, logvar) = latent::encode(&model.vae, &seqs, a.batch_size, device);
    let z = if a.refine > 0 {
        Some(latent::refine(
            &model.vae,
            &seqs,
            &mu,
            a.refine,
            a.batch_size,
            device,
        )?)
    } else {
        None
    };
    let mut codes = vec![mu, logvar];
    codes.extend(z);
    if let (EncodeFormat::Npy, Some(path)) = (a.format, &a.output) {
        return codes::write_npy(path, &codes, model.vae.latent_dim);
    }
    let text = codes::to_text(&corpus, &codes, a.format)?;
    match &a.output {
        Some(path) => crate::files::write_atomic(path, text.as_bytes()),
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("writing to stdout"),
    }
}

/// `--num` sentences per code must be able to differ: sampled words, or codes drawn afresh
/// (`codes_vary`; `also` names the flag that draws them, where there is one).
fn check_num(num: usize, strategy: Strategy, codes_vary: bool, also: &str) -> Result<()> {
    anyhow::ensure!(num >= 1, "--num must be at least 1");
    anyhow::ensure!(
        num == 1 || codes_vary || matches!(strategy, Strategy::Sample { .. }),
        "--num {num} asks for several sentences per code, but greedy and beam decoding give one: sample them (--temperature above 0, --top-k K or --top-p P){also}"
    );
    Ok(())
}

/// Greedy by default, as `reconstruct`: the codes' own sentences rather than samples near them.
fn run_decode(a: DecodeCodesArgs) -> Result<()> {
    let strategy = a.decode.strategy(false)?;
    a.decode.validate()?;
    check_num(a.num, strategy, false, "")?;
    let (model, device) = a.model.load()?;
    let z = codes::read(a.input.as_deref(), a.field, model.vae.latent_dim, device)?; // [N, Z]
    let z = z.repeat_interleave_self_int(a.num as i64, 0, None); // [N*K, Z], a code's K adjacent
    let decoding = a.decode.decoding(strategy, &model);
    let texts = model.decode(&z, &decoding, a.decode.batch_size)?;
    let mut out = std::io::stdout().lock();
    for text in texts {
        writeln!(out, "{text}").context("writing to stdout")?;
    }
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=MAX_IW_SAMPLES).contains(&a.iw_samples),
        "--iw-samples must be in 1..={MAX_IW_SAMPLES}, got {}",
        a.iw_samples
    );
    check_batch_size(a.batch_size)?;
    anyhow::ensure!(
        a.beam.is_none_or(|k| (1..=MAX_BEAM).contains(&k)),
        "--beam must be in 1..={MAX_BEAM}"
    );
    let strategy = a
        .beam
        .map_or(Strategy::Greedy, |width| Strategy::Beam { width });
    let corpus = data::read_corpus(&a.file)?;
    let (model, device) = a.model.load()?;
    let mut seqs = encode_inputs(&model, &corpus)?;
    if let Some(n) = a.sentences {
        anyhow::ensure!(n >= 1, "--sentences must be at least 1");
        seqs = seqs.spread(n);
    }
    // Tokens, not sentences: batches run shortest first, and a token's K samples cost the same.
    let mut progress = Progress::new(
        std::io::stderr().is_terminal(),
        seqs.total_tokens() as u64,
        "eval [{bar:30}] {percent}% of the NLL's samples ({elapsed}<{eta})",
        "eval: the NLL's samples",
    );
    let opts = eval::EvalOptions {
        iw_samples: a.iw_samples,
        iw_kind: runtime::matmul_kind(a.precision, device),
        batch_size: a.batch_size,
        decoding: Decoding {
            no_repeat_ngram: a.no_repeat_ngram,
            ..model.decoding(strategy, model.config.train.max_len)
        },
        decode_batch: sample::DECODE_BATCH,
    };
    let r = eval::evaluate(&model.vae, &seqs, &opts, device, |done| {
        progress.set(done as u64)
    })?;
    progress.finish();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {} sentences, {} tokens (</s> counted, <s> not)",
            a.file.display(),
            r.elbo.sentences,
            r.elbo.tokens
        );
        println!("rec  {:.2}  kl {:.2}  elbo {:.2}  nats/sentence (1 sample, beta 1: an upper bound on the NLL)", r.elbo.rec, r.elbo.kl, r.elbo.neg_elbo);
        println!(
            "prior {}{}",
            model.vae.prior.describe(),
            match model.vae.prior {
                Prior::Normal => String::new(),
                Prior::Mixture(_) => format!(" (KL to N(0, I): {:.2})", r.elbo.kl_normal),
            }
        );
        println!(
            "nll  {:.2}  nats/sentence (importance-weighted, K = {}, samples in {})",
            r.nll, r.iw_samples, r.iw_precision
        );
        println!("ppl  {:.2}", r.ppl);
        println!("mi   {:.3}", r.mi);
        println!("au   {}/{}", r.elbo.au, model.vae.latent_dim);
        println!(
            "reconstruction ({} from the posterior mean): token accuracy {:.4}, exact match {:.4}, BLEU-4 {:.2}",
            r.rec_decoding, r.rec_acc, r.rec_exact, r.rec_bleu
        );
    }
    Ok(())
}

fn run_plot(a: PlotArgs) -> Result<()> {
    let dir = checkpoint::resolve(a.checkpoint.as_deref())?;
    let curves = plot::Curves::read(&dir.join(checkpoint::METRICS))?;
    let out = a.output.unwrap_or_else(|| dir.join(checkpoint::CURVES));
    anyhow::ensure!(
        out.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png")),
        "-o must name a .png file, got {}",
        out.display()
    );
    let name = dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    plot::draw(&curves, &out, &format!("textvae: {name}"), (1400, 900))?;
    println!("{}", out.display());
    Ok(())
}

fn run_vocab(a: VocabArgs) -> Result<()> {
    let spec: TokenizerSpec = a.tokenizer.parse()?;
    anyhow::ensure!(
        !matches!(spec, TokenizerSpec::File(_)),
        "--tokenizer for `vocab` must be word or bpe"
    );
    let corpus = data::read_corpus(&a.corpus)?;
    let tok = TextTokenizer::train(&spec, &corpus.lines, a.vocab_size)?;
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    tok.save(&a.output)?;
    println!(
        "{}: {} tokenizer, {} tokens, from {} sentences",
        a.output.display(),
        tok.kind(),
        tok.vocab_size(),
        corpus.lines.len()
    );
    Ok(())
}

fn run_info(a: InfoArgs) -> Result<()> {
    runtime::setup(None, a.threads)?;
    for line in runtime::info_lines() {
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, ValueEnum};

    #[test]
    fn train_help_states_the_default_target_rate() {
        let mut cli = Cli::command();
        let train = cli.find_subcommand_mut("train").expect("train subcommand");
        let help = train.render_long_help().to_string();
        let stated = format!(
            "[default: {}; 0 with --preset ptb]",
            crate::config::TARGET_KL
        );
        assert!(help.contains(&stated), "train --help lacks {stated:?}");
    }

    #[test]
    fn train_help_states_the_defaults_the_configs_have() {
        let mut cli = Cli::command();
        let train = cli.find_subcommand_mut("train").expect("train subcommand");
        let help = train.render_long_help().to_string();
        // One option's text: its line and the indented lines under it, whitespace collapsed
        // (the help wraps lines).
        let block = |flag: &str| -> String {
            let mut lines = help
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(&format!("--{flag} <")));
            let first = lines
                .next()
                .unwrap_or_else(|| panic!("no --{flag} in train --help"));
            let rest = lines.take_while(|l| !l.trim_start().starts_with('-'));
            std::iter::once(first)
                .chain(rest)
                .flat_map(str::split_whitespace)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (m, t) = (ModelConfig::default(), TrainConfig::default());
        let ptb = Preset::Ptb.recipe();
        // Where the help states one default, the preset has it too.
        assert_eq!(ptb.train.lr_schedule, t.lr_schedule);
        let both = |d: String, p: String| format!("[default: {d}; {p} with --preset ptb]");
        for (flag, stated) in [
            ("epochs", format!("[default: {}]", t.epochs)),
            (
                "batch-size",
                both(t.batch_size.to_string(), ptb.train.batch_size.to_string()),
            ),
            (
                "lr",
                both(format!("{:e}", t.lr), format!("{:e}", ptb.train.lr)),
            ),
            ("clip-norm", format!("[default: {}]", t.clip_norm)),
            ("seed", format!("[default: {}]", t.seed)),
            (
                "max-len",
                both(t.max_len.to_string(), ptb.train.max_len.to_string()),
            ),
            ("valid-share", format!("[default: {}]", t.valid_share)),
            (
                "word-dropout",
                both(
                    t.word_dropout.to_string(),
                    ptb.train.word_dropout.to_string(),
                ),
            ),
            ("emb-dim", format!("[default: {}]", m.emb_dim)),
            ("hidden-dim", format!("[default: {}]", m.hidden_dim)),
            ("latent-dim", format!("[default: {}]", m.latent_dim)),
            ("num-layers", format!("[default: {}]", m.num_layers)),
            ("conv-filters", format!("[default: {}]", m.conv_filters)),
            (
                "emb-dropout",
                both(m.emb_dropout.to_string(), ptb.model.emb_dropout.to_string()),
            ),
            (
                "out-dropout",
                both(m.out_dropout.to_string(), ptb.model.out_dropout.to_string()),
            ),
            ("weight-drop", format!("[default: {}]", m.weight_drop)),
            (
                "prior-components",
                format!("[default: {}]", t.prior_components),
            ),
            ("layer-dropout", format!("[default: {}]", m.layer_dropout)),
            ("enc-dropout", format!("[default: {}]", m.enc_dropout)),
            (
                "dropout-mask",
                format!(
                    "[default: {}]",
                    m.dropout_mask
                        .to_possible_value()
                        .expect("a value")
                        .get_name()
                ),
            ),
        ] {
            let text = block(flag);
            assert!(
                text.contains(&stated),
                "--{flag} should state {stated:?}: {text}"
            );
        }
    }
}
