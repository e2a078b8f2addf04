//! Configuration as data: the model's shape and the training recipe, as serde structs with
//! defaults. They are validated once, before any work, and saved as JSON inside every checkpoint;
//! loading rebuilds the model from that JSON before it reads a single weight.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// Shape of the network. `vocab_size` comes from the tokenizer, never from the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: i64,
    /// Token embedding size, shared in shape (not weights) by encoder and decoder.
    pub emb_dim: i64,
    /// Convolution widths of the encoder (Kim 2014 style n-gram detectors).
    pub kernel_widths: Vec<i64>,
    /// Filters per convolution width.
    pub conv_filters: i64,
    /// Size of z.
    pub latent_dim: i64,
    pub hidden_dim: i64,
    pub num_layers: i64,
    /// Dropout on the decoder's input embeddings (training only).
    pub emb_dropout: f64,
    /// Dropout on the LSTM outputs before the vocabulary projection (training only).
    pub out_dropout: f64,
    /// The decoder's output projection reuses its input embedding matrix (Press & Wolf 2017;
    /// Inan et al. 2017). Needs `emb_dim == hidden_dim`.
    pub tie_embeddings: bool,
    /// BN-VAE (Zhu et al. 2020): the posterior means are batch-normalised with this fixed scale,
    /// which puts E[KL] >= latent_dim * gamma^2 / 2 (0 = off). A checkpoint without the field
    /// predates it and has no such layer.
    #[serde(default)]
    pub bn_gamma: f64,
    /// The encoder reads tokens through the decoder's input embeddings, which the language-model
    /// signal trains at every position, instead of a matrix of its own. A checkpoint without the
    /// field predates it and has separate embeddings.
    #[serde(default)]
    pub share_embeddings: bool,
    /// A skip path from z to the output logits (Dieng et al. 2019): every position's word
    /// choice sees z directly. A checkpoint without the field predates it and has none.
    #[serde(default)]
    pub z_skip: bool,
    /// The skip path enters the output layer through its input (z -> [H] added to the LSTM
    /// output) rather than as a logit per word ([V, Z]), so it scores words through the output
    /// embeddings that every position trains. A checkpoint without the field predates it.
    #[serde(default)]
    pub skip_hidden: bool,
    /// DropConnect on the decoder LSTM's hidden-to-hidden weights (Merity et al. 2017's weight
    /// drop; training only): one mask per step, shared by the batch and every time step, so it
    /// regularises the recurrence itself, which input and output dropout do not reach. A
    /// checkpoint without the field predates it and has none.
    #[serde(default)]
    pub weight_drop: f64,
    /// Dropout between stacked decoder LSTM layers (training only; Zaremba et al. 2014 drop
    /// every non-recurrent connection, and with two or more layers this is the one the embedding
    /// and output dropouts leave out). A checkpoint without the field predates it and has none.
    #[serde(default)]
    pub layer_dropout: f64,
    /// How the embedding and output dropouts draw their masks: per token, or one per sentence
    /// shared by every time step. A checkpoint without the field predates it: per token.
    #[serde(default)]
    pub dropout_mask: DropoutMask,
    /// Dropout on the encoder's pooled convolution features before the posterior heads
    /// (training only; Kim 2014's regulariser of this encoder). A checkpoint without the field
    /// predates it and has none.
    #[serde(default)]
    pub enc_dropout: f64,
}

/// How the decoder's embedding and output dropouts draw their masks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DropoutMask {
    /// A fresh mask at every position (Zaremba et al. 2014).
    #[default]
    Token,
    /// One mask per sentence, the same at every time step (Gal & Ghahramani 2016's variational
    /// dropout, Merity et al. 2017's locked dropout): a dropped unit stays dropped for the
    /// whole sentence, so the LSTM cannot recover it from the neighbouring positions.
    Sentence,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            emb_dim: 256,
            kernel_widths: vec![3, 4, 5],
            conv_filters: 128,
            latent_dim: 32,
            hidden_dim: 256,
            num_layers: 1,
            // 0.1, not 0.3: a ten-minute run underfits (training and validation
            // reconstruction stay level), and the lighter dropout is worth about a nat of NLL.
            emb_dropout: 0.1,
            out_dropout: 0.1,
            // Tied: the words z must carry are scored by the very vectors the encoder reads,
            // which the language model trains at every position; a rare word is then as easy
            // to pass through z as a common one (README, Why the defaults).
            tie_embeddings: true,
            bn_gamma: 0.0,
            share_embeddings: true,
            z_skip: true,
            skip_hidden: true,
            weight_drop: 0.0,
            layer_dropout: 0.0,
            dropout_mask: DropoutMask::Token,
            enc_dropout: 0.0,
        }
    }
}

impl ModelConfig {
    /// Everything, the vocabulary size (known once the tokenizer exists) included.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.vocab_size > 4,
            "vocabulary size must exceed the 4 special tokens, got {}",
            self.vocab_size
        );
        self.validate_shape()
    }

    /// Trainable parameters of the model this configuration builds (model.rs), counted without
    /// building it, so that a model too large for the machine is refused before it is allocated.
    pub fn parameter_count(&self) -> i64 {
        let (v, e, h, z, l) = (
            self.vocab_size,
            self.emb_dim,
            self.hidden_dim,
            self.latent_dim,
            self.num_layers,
        );
        let f = self.conv_filters;
        let convs: i64 = self.kernel_widths.iter().map(|&k| f * e * k + f).sum();
        let features = f * self.kernel_widths.len() as i64;
        let encoder = if self.share_embeddings { 0 } else { v * e }
            + convs
            + 2 * (features * z + z)
            + if self.bn_gamma > 0.0 { z } else { 0 };
        // LSTM layer 0 reads [E + Z]; each layer has input and hidden weights and two biases.
        let lstm: i64 = (0..l)
            .map(|i| 4 * h * (if i == 0 { e + z } else { h }) + 4 * h * h + 8 * h)
            .sum();
        let skip = match (self.z_skip, self.skip_hidden) {
            (false, _) => 0,
            (true, true) => h * z,
            (true, false) => v * z,
        };
        let decoder = v * e
            + (z * 2 * l * h + 2 * l * h)
            + lstm
            + v
            + if self.tie_embeddings { 0 } else { v * h }
            + skip;
        encoder + decoder
    }

    /// The user's choices alone: checked before any slow work, when the vocabulary is not known.
    pub fn validate_shape(&self) -> Result<()> {
        ensure!(
            self.emb_dim > 0,
            "--emb-dim must be positive, got {}",
            self.emb_dim
        );
        ensure!(
            self.latent_dim > 0,
            "--latent-dim must be positive, got {}",
            self.latent_dim
        );
        ensure!(
            self.hidden_dim > 0,
            "--hidden-dim must be positive, got {}",
            self.hidden_dim
        );
        ensure!(
            self.num_layers > 0,
            "--num-layers must be positive, got {}",
            self.num_layers
        );
        ensure!(
            self.conv_filters > 0,
            "--conv-filters must be positive, got {}",
            self.conv_filters
        );
        ensure!(
            !self.kernel_widths.is_empty(),
            "--kernel-widths needs at least one width"
        );
        ensure!(
            !self.tie_embeddings || self.emb_dim == self.hidden_dim,
            "--tie-embeddings needs --emb-dim equal to --hidden-dim, got {} and {}",
            self.emb_dim,
            self.hidden_dim
        );
        ensure!(
            self.bn_gamma >= 0.0 && self.bn_gamma.is_finite(),
            "--bn-gamma must be >= 0, got {}",
            self.bn_gamma
        );
        for &k in &self.kernel_widths {
            ensure!((1..=16).contains(&k), "kernel width {k} is outside 1..=16");
        }
        for (name, p) in [
            ("--emb-dropout", self.emb_dropout),
            ("--out-dropout", self.out_dropout),
            ("--weight-drop", self.weight_drop),
            ("--layer-dropout", self.layer_dropout),
            ("--enc-dropout", self.enc_dropout),
        ] {
            ensure!((0.0..1.0).contains(&p), "{name} must be in [0, 1), got {p}");
        }
        Ok(())
    }
}

/// Named starting points for a run's configuration; the flags a user gives are laid over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Byte-level BPE, sentences up to 64 tokens: for a corpus of your own.
    Default,
    /// Penn Treebank as the literature evaluates it (REFERENCE §3): word tokenizer, sentences up
    /// to 100 tokens, tied input/output embeddings, no word dropout; the recipe bench/ptb.sh
    /// measures.
    Ptb,
    /// Penn Treebank for an hour or more: `ptb` with the 512-wide model of the README's PTB
    /// table (a target rate of 8 nats, embeddings shared and tied, the skip path, dropout 0.5,
    /// weight drop 0.3, weight decay 0.05, lr 2e-3). Half as many tokens per second as `ptb`;
    /// test NLL 99.22-99.53 in an hour (three runs) where `ptb` has 102.44.
    PtbWide,
}

/// What a preset fixes: the tokenizer and both configs.
pub struct Recipe {
    pub tokenizer: &'static str,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

impl Preset {
    pub fn recipe(self) -> Recipe {
        match self {
            Preset::Default => Recipe {
                tokenizer: "bpe",
                model: ModelConfig::default(),
                train: TrainConfig::default(),
            },
            // The recipe as benchmarked (README, Results): free bits, not a target rate, and the
            // encoder with embeddings of its own; the newer corpus defaults are not measured on
            // PTB yet.
            Preset::Ptb => Recipe {
                tokenizer: "word",
                model: ModelConfig {
                    tie_embeddings: true,
                    share_embeddings: false,
                    z_skip: false,
                    emb_dropout: 0.3,
                    out_dropout: 0.3,
                    ..ModelConfig::default()
                },
                // Word dropout cost 3.5 nats of validation reconstruction after 2 epochs.
                train: TrainConfig {
                    max_len: 100,
                    word_dropout: 0.0,
                    free_bits: 0.15,
                    target_kl: 0.0,
                    // Held, then cooled linearly over the last quarter of the budget (the
                    // defaults' schedule). Batches of 64 at 4e-3: validation -ELBO 107.42
                    // after 10 minutes on 2 cores, where 48 at 3.5e-3 reached 107.73 and 32 at
                    // 3e-3 108.11 (32 at 2e-3: 108.41; lr 1e-3 halved on plateaus: ~113);
                    // README, How --preset ptb was chosen.
                    batch_size: 64,
                    lr: 4e-3,
                    // Without it the validation KL ran away from epoch 12 (a few unseen
                    // sentences' codes far outside the training range); with it 16 epochs stayed
                    // at 4.3-5.1 nats and each epoch's ELBO was 0.3-0.6 nats better (README,
                    // The free-bits run-away and its fix).
                    encoder_weight_decay: 0.1,
                    // The PTB recipe was measured without it.
                    weight_decay: 0.0,
                    ..TrainConfig::default()
                },
            },
            Preset::PtbWide => Self::ptb_wide(),
        }
    }

    /// The recipe of the README's best PTB row: `ptb` widened to 512 with the regularisers an
    /// hour at that width needs (README, Penn Treebank benchmark; docs/ptb.md).
    fn ptb_wide() -> Recipe {
        let Recipe {
            tokenizer,
            model,
            train,
        } = Preset::Ptb.recipe();
        Recipe {
            tokenizer,
            model: ModelConfig {
                emb_dim: 512,
                hidden_dim: 512,
                share_embeddings: true,
                z_skip: true,
                emb_dropout: 0.5,
                out_dropout: 0.5,
                weight_drop: 0.3,
                ..model
            },
            train: TrainConfig {
                // A target rate instead of free bits: KL >= 7 nats where free bits held 4.5.
                target_kl: 8.0,
                free_bits: 0.0,
                lr: 2e-3,
                // Without it the 512-wide model overfit from epoch 9 and the hour ended at
                // test NLL 100.10 (fitted prior); with it 99.40, validation -ELBO 1.15 nats lower.
                weight_decay: 0.05,
                ..train
            },
        }
    }
}

/// How beta, the weight of the KL term, moves with the training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum KlSchedule {
    /// beta fixed for the whole run.
    Constant { beta: f64 },
    /// beta rises linearly from `start` to 1 over `steps` (He et al. 2019).
    Linear { start: f64, steps: u64 },
    /// beta = 1 / (1 + exp(-k (step - x0))) (Bowman et al. 2016).
    Logistic { k: f64, x0: f64 },
    /// Cycles of `period` steps: beta rises linearly from `start` to 1 over the first `ratio`
    /// of each cycle and stays at 1 for the rest (Fu et al. 2019).
    Cyclical { period: u64, ratio: f64, start: f64 },
}

impl Default for KlSchedule {
    fn default() -> Self {
        KlSchedule::Linear {
            start: 0.0,
            steps: 2000,
        }
    }
}

impl KlSchedule {
    /// The beta the schedule ends at, which the objective is judged at: 1 except for a constant.
    pub fn final_beta(&self) -> f64 {
        match *self {
            KlSchedule::Constant { beta } => beta,
            _ => 1.0,
        }
    }

    /// The first step from which beta stays at its final value (to within 1%); `None` for the
    /// cyclical schedule, which never settles.
    pub fn settled_at(&self) -> Option<u64> {
        match *self {
            KlSchedule::Constant { .. } => Some(0),
            KlSchedule::Linear { steps, .. } => Some(steps),
            // 1 / (1 + exp(-k (s - x0))) >= 0.99 from s = x0 + ln(99) / k on.
            KlSchedule::Logistic { k, x0 } => Some((x0 + 99f64.ln() / k).max(0.0).ceil() as u64),
            KlSchedule::Cyclical { .. } => None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            KlSchedule::Constant { beta } => {
                ensure!(
                    beta >= 0.0 && beta.is_finite(),
                    "--beta must be >= 0, got {beta}"
                )
            }
            KlSchedule::Linear { start, steps } => {
                ensure!(
                    (0.0..=1.0).contains(&start),
                    "--kl-start must be in [0, 1], got {start}"
                );
                ensure!(steps > 0, "--kl-steps must be positive");
            }
            KlSchedule::Logistic { k, x0 } => {
                ensure!(k > 0.0 && k.is_finite(), "--kl-k must be positive, got {k}");
                ensure!(x0.is_finite(), "--kl-x0 must be finite");
            }
            KlSchedule::Cyclical {
                period,
                ratio,
                start,
            } => {
                ensure!(period > 0, "--kl-steps (the cycle length) must be positive");
                ensure!(
                    ratio > 0.0 && ratio <= 1.0,
                    "--kl-ratio must be in (0, 1], got {ratio}"
                );
                ensure!(
                    (0.0..=1.0).contains(&start),
                    "--kl-start must be in [0, 1], got {start}"
                );
            }
        }
        Ok(())
    }
}

/// Which weights `model.safetensors` keeps, judged on the validation sentences after every epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// The training objective at the schedule's final beta: rec + beta * KL term (free bits and
    /// the target rate applied), so a run keeps what it was trained for (an autoencoder at
    /// beta 0 keeps its best reconstruction).
    #[default]
    Objective,
    /// The negative ELBO at beta 1 (rec + KL), whatever the training objective.
    Elbo,
    /// Importance-weighted NLL (K = 20) on up to 500 validation sentences: the density the
    /// literature reports, at a few seconds an epoch.
    Nll,
    /// The weights at the end of the last epoch.
    Last,
}

impl Selection {
    pub fn describe(self) -> &'static str {
        match self {
            Selection::Objective => "validation objective at the final beta",
            Selection::Elbo => "validation ELBO at beta 1",
            Selection::Nll => "validation IW-NLL (K = 20, up to 500 sentences)",
            Selection::Last => "last epoch",
        }
    }
}

/// The number format of the matrix products in training steps (the encoder's convolutions, the
/// LSTM, the output layer) and in `eval`'s importance samples (the LSTM and the output layer).
/// Weights, optimiser state,
/// the softmax and the loss stay float32 either way (mixed precision, Micikevicius et al. 2018,
/// with bfloat16's float32 range so no loss scaling is needed); validation stays float32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 where the hardware multiplies it natively (x86 CPUs with AVX512-BF16: 2.4x the
    /// float32 matmul throughput measured on the project's 2-core machine), else f32.
    #[default]
    Auto,
    F32,
    Bf16,
}

/// How the learning rate moves during a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `lr` held, then a linear decay to 1e-5 over the last `lr_cooldown` share of the run's
    /// budget: --max-minutes or --epochs, whichever ends first (budget-aware decay, Li, Yumer &
    /// Ramanan 2020; warmup-stable-decay, Hu et al. 2024). A function of the run's progress, so a
    /// resumed run is where the uninterrupted one would be.
    #[default]
    Linear,
    /// Halved after --lr-patience epochs without a better --select criterion, counted only once
    /// beta has settled.
    Plateau,
}

impl LrSchedule {
    /// What a checkpoint written before the choice existed was trained with.
    fn legacy() -> Self {
        LrSchedule::Plateau
    }
}

/// The rate z holds by default, in nats per sentence: on short everyday sentences (tatoeba),
/// ten minutes with the linear cool-down, the most measured that kept the held-out NLL within 3%
/// of the old free-bits floor of 4.8 nats (31.51 <= 31.77), at token accuracy 0.50 and exact
/// match 0.17 (README, "The rate table").
pub const TARGET_KL: f64 = 18.0;

/// Weight decay on every weight by default: ten minutes on Tatoeba English, Chinese and short
/// Bible sentences, 0.05 lowered the held-out NLL by 0.2-0.7 nats and raised unseen token
/// accuracy by 0.02-0.04 against none (docs/defaults.md, "Weight decay on every weight").
pub const WEIGHT_DECAY: f64 = 0.05;

/// The mixture prior's components by default. On the tatoeba protocol's ten-minute model the
/// held-out NLL (K = 50) was 31.33 under N(0, I), 31.04 with 250 components, 31.00 with 500,
/// 30.89 with 1,000 and 30.77 with 2,000; the fit (7 s for 1,000 on 26k sentences, alone on 2
/// cores) and `eval`'s log p(z) grow with K (README, The prior fitted after training).
pub const PRIOR_COMPONENTS: usize = 1000;

/// More components than this are refused: the mixture's log-density costs K x Z per z.
pub const MAX_PRIOR_COMPONENTS: usize = 100_000;

/// The training recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub lr: f64,
    /// Gradient norm clipping threshold.
    pub clip_norm: f64,
    pub epochs: usize,
    /// Wall-clock budget; training stops (and saves) when it is spent.
    pub max_minutes: Option<f64>,
    /// Sentences longer than this many tokens (before `</s>`) are skipped and counted.
    pub max_len: usize,
    /// Share of the corpus held out for validation when no `--valid` file is given.
    pub valid_share: f64,
    pub seed: u64,
    /// Probability of replacing a decoder input token by `<unk>` (Bowman et al. 2016).
    pub word_dropout: f64,
    /// Free bits lambda per latent dimension, in nats (0 = off).
    pub free_bits: f64,
    /// The rate the user asks z to hold, in nats per sentence (0 = off): the KL term becomes
    /// max(target_kl, batch-mean KL), a minimum desired rate (Pelsmaeker & Aziz 2020) in its
    /// hinge form, so KL below the target costs nothing and above it costs as in the ELBO.
    pub target_kl: f64,
    /// Weight of the bag-of-words loss from z (Zhao et al. 2017): an MLP predicts every word of
    /// the sentence from z, which makes the encoder put the sentence's content into z from the
    /// first step instead of waiting for the decoder to ask for it (0 = off).
    pub bow_weight: f64,
    pub kl_schedule: KlSchedule,
    /// Decoupled weight decay (AdamW, Loshchilov & Hutter 2019) on the encoder's own weights
    /// (not an embedding it shares with the decoder): each step takes lr * this share off them.
    /// Adam moves weights the objective barely constrains by about lr per step whatever their
    /// gradient, and under free bits the encoder has such directions; the decay pulls them back
    /// (README: the free-bits run-away). A checkpoint without the field had none.
    #[serde(default)]
    pub encoder_weight_decay: f64,
    /// Decoupled weight decay (AdamW) on every trainable variable, the encoder's included
    /// (which take the larger of this and `encoder_weight_decay`): each step takes lr * this
    /// share off them. A checkpoint without the field had none.
    #[serde(default)]
    pub weight_decay: f64,
    /// Decay of an exponential moving average of the weights (Polyak averaging; 0 = off): when
    /// on, validation judges the average and `model.safetensors` keeps it, while training goes
    /// on from the weights themselves. A checkpoint without the field had none.
    #[serde(default)]
    pub ema_decay: f64,
    /// Steps of autoencoder pretraining before the VAE (Li et al. 2019): beta 0 for this many
    /// steps, then the decoder is re-initialised (the encoder, and embeddings it shares, kept)
    /// and the KL schedule starts from its own step 0 (0 = off).
    #[serde(default)]
    pub ae_steps: u64,
    /// How the kept weights are chosen; also what the plateau learning-rate schedule watches.
    pub select: Selection,
    #[serde(default = "LrSchedule::legacy")]
    pub lr_schedule: LrSchedule,
    /// Linear schedule: the last share of the budget over which the rate decays (1 = all of it).
    pub lr_cooldown: f64,
    /// Plateau schedule: epochs without validation improvement before the learning rate is
    /// halved; counted only once beta has settled.
    pub lr_patience: usize,
    pub lr_decay: f64,
    pub min_lr: f64,
    /// Steps per logging window (log line and metrics record).
    pub log_every: u64,
    /// Non-finite steps in a row (loss or gradient NaN/inf, each skipped) after which training
    /// stops with an error, keeping the last checkpoint.
    pub max_nonfinite: u64,
    /// Minutes between checkpoints within an epoch (0 = at epoch ends only).
    pub save_every: f64,
    /// The matrix products' number format in training steps.
    pub precision: Precision,
    /// Components of the Gaussian mixture fitted as the prior to the training sentences'
    /// posteriors when the run ends (0 = keep N(0, I)). A checkpoint without the field predates
    /// it and kept N(0, I).
    #[serde(default)]
    pub prior_components: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            // 2e-3 with the linear cool-down: a ten-minute run is far from converged, and the
            // larger step held until the last quarter was worth 1.4 nats of held-out NLL
            // (README, Why the defaults).
            lr: 2e-3,
            clip_norm: 5.0,
            epochs: 100,
            max_minutes: None,
            max_len: 64,
            valid_share: 0.05,
            seed: 1234,
            word_dropout: 0.3,
            free_bits: 0.0,
            target_kl: TARGET_KL,
            bow_weight: 0.0,
            encoder_weight_decay: 0.0,
            weight_decay: WEIGHT_DECAY,
            ema_decay: 0.0,
            kl_schedule: KlSchedule::default(),
            ae_steps: 0,
            select: Selection::default(),
            lr_schedule: LrSchedule::default(),
            lr_cooldown: 0.25,
            lr_patience: 2,
            lr_decay: 0.5,
            min_lr: 1e-5,
            log_every: 50,
            max_nonfinite: 20,
            save_every: 10.0,
            precision: Precision::default(),
            prior_components: PRIOR_COMPONENTS,
        }
    }
}

impl TrainConfig {
    /// The first step from which beta stays at its final value, autoencoder pretraining counted.
    pub fn settled_at(&self) -> Option<u64> {
        self.kl_schedule.settled_at().map(|s| s + self.ae_steps)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch_size > 0, "--batch-size must be positive");
        ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "--lr must be positive, got {}",
            self.lr
        );
        ensure!(
            self.clip_norm > 0.0,
            "--clip-norm must be positive, got {}",
            self.clip_norm
        );
        ensure!(self.epochs > 0, "--epochs must be positive");
        if let Some(m) = self.max_minutes {
            ensure!(
                m > 0.0 && m.is_finite(),
                "--max-minutes must be positive, got {m}"
            );
        }
        ensure!(self.max_len > 0, "--max-len must be positive");
        ensure!(
            self.prior_components <= MAX_PRIOR_COMPONENTS,
            "--prior-components must be at most {MAX_PRIOR_COMPONENTS}, got {}",
            self.prior_components
        );
        ensure!(
            self.valid_share > 0.0 && self.valid_share < 0.5,
            "--valid-share must be in (0, 0.5), got {}",
            self.valid_share
        );
        ensure!(
            (0.0..1.0).contains(&self.word_dropout),
            "--word-dropout must be in [0, 1), got {}",
            self.word_dropout
        );
        ensure!(
            self.free_bits >= 0.0 && self.free_bits.is_finite(),
            "--free-bits must be >= 0, got {}",
            self.free_bits
        );
        ensure!(
            self.target_kl >= 0.0 && self.target_kl.is_finite(),
            "--target-kl must be >= 0, got {}",
            self.target_kl
        );
        ensure!(
            self.bow_weight >= 0.0 && self.bow_weight.is_finite(),
            "--bow-weight must be >= 0, got {}",
            self.bow_weight
        );
        ensure!(
            self.encoder_weight_decay >= 0.0 && self.encoder_weight_decay.is_finite(),
            "--encoder-weight-decay must be >= 0, got {}",
            self.encoder_weight_decay
        );
        ensure!(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "--weight-decay must be >= 0, got {}",
            self.weight_decay
        );
        ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "--ema-decay must be in [0, 1), got {}",
            self.ema_decay
        );
        ensure!(
            self.save_every >= 0.0 && self.save_every.is_finite(),
            "--save-every must be >= 0 minutes, got {}",
            self.save_every
        );
        ensure!(
            self.lr_cooldown > 0.0 && self.lr_cooldown <= 1.0,
            "--lr-cooldown must be in (0, 1], got {}",
            self.lr_cooldown
        );
        if !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            bail!("lr_decay must be in (0, 1], got {}", self.lr_decay);
        }
        ensure!(self.log_every > 0, "--log-every must be positive");
        ensure!(self.max_nonfinite > 0, "--max-nonfinite must be positive");
        self.kl_schedule.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_once_vocab_is_known() {
        let mut m = ModelConfig::default();
        assert!(m.validate().is_err(), "vocab 0 must be rejected");
        m.vocab_size = 100;
        m.validate().unwrap();
        TrainConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_are_rejected() {
        let m = ModelConfig {
            vocab_size: 100,
            latent_dim: 0,
            ..Default::default()
        };
        assert!(m.validate().unwrap_err().to_string().contains("latent"));
        let t = TrainConfig {
            word_dropout: 1.5,
            ..Default::default()
        };
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("word-dropout"));
        let t = TrainConfig {
            encoder_weight_decay: -0.1,
            ..Default::default()
        };
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("encoder-weight-decay"), "{err}");
        for (t, flag) in [
            (
                TrainConfig {
                    weight_decay: f64::NAN,
                    ..Default::default()
                },
                "--weight-decay",
            ),
            (
                TrainConfig {
                    ema_decay: 1.0,
                    ..Default::default()
                },
                "--ema-decay",
            ),
        ] {
            let err = t.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn ptb_wide_is_the_recipe_the_ptb_table_measured() {
        // The configs of that run (bench/results/ptb512dec-*, `--preset ptb` with the flags it
        // names), less what the corpus and the budget set.
        let measured = serde_json::json!({
            "model": {
                "emb_dim": 512, "kernel_widths": [3, 4, 5], "conv_filters": 128, "latent_dim": 32,
                "hidden_dim": 512, "num_layers": 1, "emb_dropout": 0.5, "out_dropout": 0.5,
                "tie_embeddings": true, "bn_gamma": 0.0, "share_embeddings": true, "z_skip": true,
                "skip_hidden": true, "weight_drop": 0.3, "layer_dropout": 0.0,
                "dropout_mask": "token", "enc_dropout": 0.0
            },
            "train": {
                "batch_size": 64, "lr": 0.002, "clip_norm": 5.0, "epochs": 100, "max_len": 100,
                "valid_share": 0.05, "seed": 1234, "word_dropout": 0.0, "free_bits": 0.0,
                "target_kl": 8.0, "bow_weight": 0.0,
                "kl_schedule": {"kind": "linear", "start": 0.0, "steps": 2000},
                "encoder_weight_decay": 0.1, "weight_decay": 0.05, "ema_decay": 0.0,
                "ae_steps": 0, "select": "objective", "lr_schedule": "linear",
                "lr_cooldown": 0.25, "lr_patience": 2, "lr_decay": 0.5, "min_lr": 1e-05,
                "log_every": 50, "max_nonfinite": 20, "save_every": 10.0, "precision": "auto",
                "prior_components": 1000
            }
        });
        let Recipe {
            tokenizer,
            model,
            train,
        } = Preset::PtbWide.recipe();
        assert_eq!(tokenizer, "word");
        let recipe = serde_json::json!({ "model": model, "train": train });
        for part in ["model", "train"] {
            for (key, value) in measured[part].as_object().unwrap() {
                assert_eq!(&recipe[part][key], value, "{part}.{key}");
            }
        }
    }

    #[test]
    fn config_round_trips_through_json() {
        let t = TrainConfig {
            kl_schedule: KlSchedule::Cyclical {
                period: 100,
                ratio: 0.5,
                start: 0.0,
            },
            ..Default::default()
        };
        let s = serde_json::to_string(&t).unwrap();
        let back: TrainConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(t, back);
    }

    #[test]
    fn schedules_say_when_beta_settles_and_where() {
        let lin = KlSchedule::Linear {
            start: 0.0,
            steps: 300,
        };
        assert_eq!((lin.settled_at(), lin.final_beta()), (Some(300), 1.0));
        let c = KlSchedule::Constant { beta: 0.0 };
        assert_eq!((c.settled_at(), c.final_beta()), (Some(0), 0.0));
        let log = KlSchedule::Logistic { k: 0.01, x0: 500.0 };
        let s = log.settled_at().unwrap();
        assert!(log.beta(s) >= 0.99 && log.beta(s - 2) < 0.99, "{s}");
        let cyc = KlSchedule::Cyclical {
            period: 10,
            ratio: 0.5,
            start: 0.0,
        };
        assert_eq!(cyc.settled_at(), None);
    }
}
