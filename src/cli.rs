//! The command line: one clap `Args` struct per subcommand and the function that runs it. Flags
//! that tune the model or training are `Option`s laid over the config structs' defaults, so the
//! defaults live in one place (`config.rs`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::checkpoint;
use crate::config::{KlSchedule, ModelConfig, TrainConfig};
use crate::runtime;
use crate::sample::{self, GenerateOptions, Strategy};
use crate::tokenizer::{TextTokenizer, TokenizerSpec};
use crate::train::{self, StopReason, TrainRequest};

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
    /// `word`, `bpe`, or a saved tokenizer .json.
    #[arg(long, default_value = "bpe")]
    pub tokenizer: String,
    /// Vocabulary size [default: 8000 for bpe, 20000 for word].
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Continue the run in the checkpoint directory.
    #[arg(long)]
    pub resume: bool,
    /// Replace a model already in the checkpoint directory.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Wall-clock budget in minutes; whichever of this and --epochs comes first stops training.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Sentences longer than this many tokens are skipped (and counted).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Share held out for validation when --valid is not given.
    #[arg(long)]
    pub valid_share: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Probability that a decoder input word becomes <unk> while training.
    #[arg(long)]
    pub word_dropout: Option<f64>,
    /// Free bits per latent dimension in nats (0 = off).
    #[arg(long)]
    pub free_bits: Option<f64>,
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
    #[arg(long)]
    pub emb_dim: Option<i64>,
    #[arg(long)]
    pub hidden_dim: Option<i64>,
    #[arg(long)]
    pub latent_dim: Option<i64>,
    #[arg(long)]
    pub num_layers: Option<i64>,
    #[arg(long)]
    pub conv_filters: Option<i64>,
    /// Encoder convolution widths, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub kernel_widths: Option<Vec<i64>>,
    #[arg(long)]
    pub emb_dropout: Option<f64>,
    #[arg(long)]
    pub out_dropout: Option<f64>,
    /// Steps per log line and metrics record.
    #[arg(long)]
    pub log_every: Option<u64>,
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
    pub fn model_config(&self) -> ModelConfig {
        let mut m = ModelConfig::default();
        set(&mut m.emb_dim, self.emb_dim);
        set(&mut m.hidden_dim, self.hidden_dim);
        set(&mut m.latent_dim, self.latent_dim);
        set(&mut m.num_layers, self.num_layers);
        set(&mut m.conv_filters, self.conv_filters);
        set(&mut m.kernel_widths, self.kernel_widths.clone());
        set(&mut m.emb_dropout, self.emb_dropout);
        set(&mut m.out_dropout, self.out_dropout);
        m
    }

    pub fn train_config(&self) -> TrainConfig {
        let mut t = TrainConfig::default();
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
        set(&mut t.log_every, self.log_every);
        t.kl_schedule = self.kl_schedule(t.kl_schedule);
        t
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

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory [default: the latest trained model].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Number of sentences.
    #[arg(short = 'n', long = "num", default_value_t = 10)]
    pub n: usize,
    /// Sampling temperature; 0 = argmax.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Seed for reproducible samples [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Maximum tokens per sentence [default: the model's training --max-len].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Sentences decoded at once.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub threads: Option<usize>,
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

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => run_train(*a),
        Command::Generate(a) => run_generate(a),
        Command::Vocab(a) => run_vocab(a),
        Command::Info(a) => run_info(a),
    }
}

fn run_train(a: TrainArgs) -> Result<()> {
    let device = runtime::parse_device(&a.device)?;
    let req = TrainRequest {
        corpus: a.corpus.clone(),
        valid: a.valid.clone(),
        out: a.out.clone(),
        tokenizer: a.tokenizer.parse()?,
        vocab_size: a.vocab_size,
        model: a.model_config(),
        train: a.train_config(),
        device,
        resume: a.resume,
        force: a.force,
    };
    // Validate before any slow work; vocab_size is filled in from the tokenizer later.
    req.train.validate()?;
    ModelConfig {
        vocab_size: 100,
        ..req.model.clone()
    }
    .validate()?;
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
        summary.valid.elbo,
        summary.valid.au
    );
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let strategy = Strategy::from_temperature(a.temperature)?;
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be positive");
    if let Some(0) = a.max_len {
        anyhow::bail!("--max-len must be positive");
    }
    let device = runtime::parse_device(&a.device)?;
    runtime::setup(Some(a.seed.unwrap_or_else(rand::random)), a.threads)?;
    let dir = checkpoint::resolve(a.checkpoint.as_deref())?;
    let model = checkpoint::load(&dir, device)?;
    let opts = GenerateOptions {
        n: a.n,
        strategy,
        max_len: a.max_len.unwrap_or(model.config.train.max_len),
        batch_size: a.batch_size,
    };
    let lines = sample::generate(&model.vae, &model.tokenizer, device, &opts)?;
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn run_vocab(a: VocabArgs) -> Result<()> {
    let spec: TokenizerSpec = a.tokenizer.parse()?;
    anyhow::ensure!(
        !matches!(spec, TokenizerSpec::File(_)),
        "--tokenizer for `vocab` must be word or bpe"
    );
    let corpus = crate::data::read_corpus(&a.corpus)?;
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
