//! The training loop: Adam on rec + beta * KL (with free bits and word dropout), gradient-norm
//! clipping, per-epoch validation with the evaluation code, learning rate halved on a plateau,
//! best-by-validation weights kept, and atomic checkpoints so a run can be killed at any moment
//! and resumed.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind};

use crate::checkpoint::{self as ckpt, CheckpointConfig, TrainState};
use crate::config::{ModelConfig, TrainConfig};
use crate::data::{self, Batch, Encoded};
use crate::eval::{evaluate_elbo, perplexity, ElboStats};
use crate::loss::{kl_per_dim, kl_term, word_dropout};
use crate::model::Vae;
use crate::tokenizer::{TextTokenizer, TokenizerSpec};

/// Everything a training run needs, as the CLI (or a test) states it.
#[derive(Clone, Debug)]
pub struct TrainRequest {
    pub corpus: PathBuf,
    pub valid: Option<PathBuf>,
    /// Checkpoint directory; default `checkpoints/<corpus file stem>`.
    pub out: Option<PathBuf>,
    pub tokenizer: TokenizerSpec,
    pub vocab_size: Option<usize>,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub device: Device,
    /// Continue from the checkpoint in `out` (its configs are kept; `epochs` and `max_minutes`
    /// come from this request).
    pub resume: bool,
    /// Replace a checkpoint that already exists in `out`.
    pub force: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Epochs,
    TimeBudget,
    Interrupted,
}

#[derive(Debug)]
pub struct TrainSummary {
    pub dir: PathBuf,
    pub state: TrainState,
    pub valid: ElboStats,
    pub stopped_by: StopReason,
}

pub fn default_out_dir(corpus: &Path) -> PathBuf {
    let stem = corpus
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("model");
    Path::new(ckpt::CHECKPOINTS_DIR).join(stem)
}

/// Training and validation sentences, tokenized.
struct Prepared {
    tokenizer: TextTokenizer,
    /// The held-out sentences when they were split off the corpus (not given by --valid).
    heldout: Option<Vec<String>>,
    train: Encoded,
    valid: Encoded,
}

fn prepare(
    req: &TrainRequest,
    cfg: &TrainConfig,
    resume_tok: Option<TextTokenizer>,
) -> Result<Prepared> {
    let corpus = data::read_corpus(&req.corpus)?;
    let (train_lines, valid_lines, heldout) = match &req.valid {
        Some(v) => (corpus.lines, data::read_corpus(v)?.lines, None),
        None => {
            let (t, v) = data::split_valid(&corpus.lines, cfg.valid_share, cfg.seed);
            let heldout = Some(v.clone());
            (t, v, heldout)
        }
    };
    if corpus.blank_skipped > 0 {
        log(&format!("skipped {} blank lines", corpus.blank_skipped));
    }
    let tokenizer = match resume_tok {
        Some(t) => t,
        None => TextTokenizer::train(&req.tokenizer, &train_lines, req.vocab_size)?,
    };
    let train = data::encode_lines(&tokenizer, &train_lines, cfg.max_len)?;
    let valid = data::encode_lines(&tokenizer, &valid_lines, cfg.max_len)?;
    for (name, e) in [("training", &train), ("validation", &valid)] {
        if e.skipped_long > 0 || e.skipped_empty > 0 {
            log(&format!(
                "{name}: skipped {} sentences longer than --max-len {} tokens and {} with no tokens",
                e.skipped_long, cfg.max_len, e.skipped_empty
            ));
        }
    }
    ensure!(
        train.seqs.len() >= cfg.batch_size,
        "the corpus has {} usable training sentences, fewer than one batch of {} (lower --batch-size or use a larger corpus)",
        train.seqs.len(),
        cfg.batch_size
    );
    ensure!(!valid.seqs.is_empty(), "no usable validation sentences");
    Ok(Prepared {
        tokenizer,
        heldout,
        train,
        valid,
    })
}

pub fn log(msg: &str) {
    eprintln!("{msg}");
}

/// Runs training to the end of its epochs or budget, or until `stop` is set (Ctrl-C). The
/// checkpoint is saved in every case.
pub fn run(req: &TrainRequest, stop: &AtomicBool) -> Result<TrainSummary> {
    let dir = req
        .out
        .clone()
        .unwrap_or_else(|| default_out_dir(&req.corpus));
    let started = Instant::now();

    let (model_cfg, train_cfg, resume_tok, mut state) = if req.resume {
        for f in [
            ckpt::CONFIG,
            ckpt::TOKENIZER,
            ckpt::STATE,
            ckpt::LAST_WEIGHTS,
        ] {
            ensure!(
                dir.join(f).is_file(),
                "cannot resume: {} has no {f} (train without --resume first)",
                dir.display()
            );
        }
        let saved: CheckpointConfig = ckpt::read_json(&dir.join(ckpt::CONFIG))?;
        let tok = TextTokenizer::load(&dir.join(ckpt::TOKENIZER))?;
        ckpt::check_tokenizer(&tok, &saved)?;
        if let TokenizerSpec::File(f) = &req.tokenizer {
            let given = TextTokenizer::load(f)?;
            ckpt::check_tokenizer(&given, &saved)
                .with_context(|| format!("--tokenizer {}", f.display()))?;
        }
        let state: TrainState = ckpt::read_json(&dir.join(ckpt::STATE))?;
        let mut train = saved.train.clone();
        train.epochs = req.train.epochs;
        train.max_minutes = req.train.max_minutes;
        (saved.model, train, Some(tok), state)
    } else {
        if dir.join(ckpt::CONFIG).exists() && !req.force {
            bail!(
                "{} already holds a model: continue it with --resume, replace it with --force, or choose --out",
                dir.display()
            );
        }
        let state = TrainState {
            lr: req.train.lr,
            ..Default::default()
        };
        (req.model.clone(), req.train.clone(), None, state)
    };
    train_cfg.validate()?;

    let prep = prepare(req, &train_cfg, resume_tok)?;
    let mut model_cfg = model_cfg;
    model_cfg.vocab_size = prep.tokenizer.vocab_size();
    model_cfg.validate()?;

    tch::manual_seed(train_cfg.seed as i64 + state.step as i64);
    let mut vs = nn::VarStore::new(req.device);
    let vae = Vae::new(vs.root(), &model_cfg);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if req.resume {
        vs.load(dir.join(ckpt::LAST_WEIGHTS))
            .with_context(|| format!("loading {}", dir.join(ckpt::LAST_WEIGHTS).display()))?;
        log(&format!(
            "resuming {} at epoch {}, step {}, lr {:.2e}",
            dir.display(),
            state.epoch,
            state.step,
            state.lr
        ));
    } else {
        for stale in [
            ckpt::METRICS,
            ckpt::WEIGHTS,
            ckpt::LAST_WEIGHTS,
            ckpt::STATE,
            ckpt::HELDOUT,
        ] {
            let p = dir.join(stale);
            if p.exists() {
                std::fs::remove_file(&p)
                    .with_context(|| format!("removing old {}", p.display()))?;
            }
        }
        let config = CheckpointConfig {
            textvae_version: crate::VERSION.to_string(),
            libtorch_version: crate::LIBTORCH_VERSION.to_string(),
            tokenizer: prep.tokenizer.kind().to_string(),
            corpus: req.corpus.display().to_string(),
            model: model_cfg.clone(),
            train: train_cfg.clone(),
        };
        ckpt::write_json(&dir.join(ckpt::CONFIG), &config)?;
        prep.tokenizer.save(&dir.join(ckpt::TOKENIZER))?;
        if let Some(lines) = &prep.heldout {
            // Kept so that the model can be evaluated on exactly the sentences it never saw.
            ckpt::write_atomic(
                &dir.join(ckpt::HELDOUT),
                (lines.join("\n") + "\n").as_bytes(),
            )?;
        }
    }

    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let lengths: Vec<usize> = prep.train.seqs.iter().map(Vec::len).collect();
    // Each epoch's shuffle is seeded by the epoch, so a resumed run sees the batches it would
    // have seen without the interruption.
    let epoch_batches = |epoch: usize| {
        let mut rng = crate::seeded_rng(train_cfg.seed.wrapping_add(epoch as u64));
        data::bucket_batches(&lengths, train_cfg.batch_size, &mut rng)
    };
    let preview = epoch_batches(state.epoch);
    log(&format!(
        "training {} on {}: {} sentences ({} tokens), validation {} sentences; {} tokenizer, {} tokens; {:.1}M parameters; padding {:.1}% of batch positions; device {}, {} threads",
        dir.display(),
        req.corpus.display(),
        prep.train.seqs.len(),
        prep.train.total_tokens(),
        prep.valid.seqs.len(),
        prep.tokenizer.kind(),
        model_cfg.vocab_size,
        params as f64 / 1e6,
        100.0 * data::padding_share(&lengths, &preview),
        crate::runtime::device_name(req.device),
        tch::get_num_threads(),
    ));

    let mut opt = nn::Adam::default().build(&vs, state.lr)?;
    let budget = train_cfg.max_minutes.map(|m| m * 60.0);
    let elapsed_before = state.elapsed_secs;
    let mut stopped_by = StopReason::Epochs;
    let mut last_valid = ElboStats::default();
    let terminal = std::io::stderr().is_terminal();

    while state.epoch < train_cfg.epochs {
        let epoch = state.epoch + 1;
        let batches = epoch_batches(state.epoch);
        let bar = progress_bar(terminal, batches.len() as u64, epoch);
        let mut window = Window::new();
        let mut interrupted = None;
        for idx in &batches {
            let rows: Vec<&[i64]> = idx.iter().map(|&i| prep.train.seqs[i].as_slice()).collect();
            let batch = Batch::new(&rows, req.device);
            let beta = train_cfg.kl_schedule.beta(state.step);
            let inputs = word_dropout(&batch.inputs, train_cfg.word_dropout, true);
            let out = vae.forward(&batch.targets, &batch.lengths, &inputs, true, true);
            let kl = kl_per_dim(&out.mu, &out.logvar); // [B, Z]
            let rec = out.rec.mean(Kind::Float);
            let loss = &rec + beta * kl_term(&kl, train_cfg.free_bits);
            opt.backward_step_clip_norm(&loss, train_cfg.clip_norm);
            state.step += 1;
            window.add(
                f64::try_from(&loss)?,
                f64::try_from(&rec)?,
                kl.sum_dim_intlist([1].as_slice(), false, Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]),
                batch.n_tokens,
            );
            if let Some(bar) = &bar {
                bar.inc(1);
                bar.set_message(window.message(beta));
            }
            if state.step % train_cfg.log_every == 0 {
                ckpt::append_metrics(&dir, &window.record(state.step, epoch, beta, state.lr))?;
                if bar.is_none() {
                    log(&format!(
                        "epoch {epoch} step {} {}",
                        state.step,
                        window.message(beta)
                    ));
                }
                window = Window::new();
            }
            if stop.load(Ordering::SeqCst) {
                interrupted = Some(StopReason::Interrupted);
                break;
            }
            if budget.is_some_and(|b| started.elapsed().as_secs_f64() >= b) {
                interrupted = Some(StopReason::TimeBudget);
                break;
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if interrupted.is_none() {
            state.epoch += 1;
        }
        last_valid = evaluate_elbo(
            &vae,
            &prep.valid.seqs,
            train_cfg.batch_size.max(64),
            req.device,
        );
        let improved = state.best_valid.is_none_or(|b| last_valid.elbo < b - 1e-4);
        if improved {
            state.best_valid = Some(last_valid.elbo);
            state.bad_epochs = 0;
            ckpt::save_weights(&vs, &dir.join(ckpt::WEIGHTS))?;
        } else if interrupted.is_none() {
            state.bad_epochs += 1;
            if state.bad_epochs >= train_cfg.lr_patience {
                state.lr = (state.lr * train_cfg.lr_decay).max(train_cfg.min_lr);
                opt.set_lr(state.lr);
                state.bad_epochs = 0;
            }
        }
        state.elapsed_secs = elapsed_before + started.elapsed().as_secs_f64();
        log(&format!(
            "epoch {epoch}{}: valid rec {:.2} kl {:.2} elbo {:.2} (nats/sentence), ppl(elbo) {:.1}, active units {}/{}{}; lr {:.2e}; {:.0}s",
            if interrupted.is_some() { " (partial)" } else { "" },
            last_valid.rec,
            last_valid.kl,
            last_valid.elbo,
            perplexity(last_valid.elbo * last_valid.sentences as f64, last_valid.tokens),
            last_valid.au,
            model_cfg.latent_dim,
            if improved { ", best so far: saved" } else { "" },
            state.lr,
            state.elapsed_secs,
        ));
        ckpt::append_metrics(
            &dir,
            &json!({
                "kind": "epoch", "epoch": epoch, "step": state.step, "lr": state.lr,
                "partial": interrupted.is_some(),
                "valid_rec": last_valid.rec, "valid_kl": last_valid.kl,
                "valid_elbo": last_valid.elbo, "valid_au": last_valid.au,
                "elapsed_secs": state.elapsed_secs,
            }),
        )?;
        ckpt::save_weights(&vs, &dir.join(ckpt::LAST_WEIGHTS))?;
        ckpt::write_json(&dir.join(ckpt::STATE), &state)?;
        // Recorded once a loadable model exists, so `generate` never finds a half-made one.
        ckpt::record_latest(&dir)?;
        if let Some(reason) = interrupted {
            stopped_by = reason;
            break;
        }
    }
    if stopped_by == StopReason::Interrupted {
        log(&format!(
            "interrupted: checkpoint saved in {}",
            dir.display()
        ));
    }
    Ok(TrainSummary {
        dir,
        state,
        valid: last_valid,
        stopped_by,
    })
}

fn progress_bar(terminal: bool, len: u64, epoch: usize) -> Option<ProgressBar> {
    if !terminal {
        return None;
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "epoch {epoch} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}}<{{eta}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    Some(bar)
}

/// Running means over a logging window.
struct Window {
    start: Instant,
    steps: usize,
    loss: f64,
    rec: f64,
    kl: f64,
    tokens: usize,
}

impl Window {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            steps: 0,
            loss: 0.0,
            rec: 0.0,
            kl: 0.0,
            tokens: 0,
        }
    }

    fn add(&mut self, loss: f64, rec: f64, kl: f64, tokens: usize) {
        self.steps += 1;
        self.loss += loss;
        self.rec += rec;
        self.kl += kl;
        self.tokens += tokens;
    }

    fn mean(&self, x: f64) -> f64 {
        x / self.steps.max(1) as f64
    }

    fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    fn message(&self, beta: f64) -> String {
        format!(
            "loss {:.2} rec {:.2} kl {:.2} beta {:.3} {:.0} tok/s",
            self.mean(self.loss),
            self.mean(self.rec),
            self.mean(self.kl),
            beta,
            self.tokens_per_sec()
        )
    }

    fn record(&self, step: u64, epoch: usize, beta: f64, lr: f64) -> serde_json::Value {
        json!({
            "kind": "train", "step": step, "epoch": epoch,
            "loss": self.mean(self.loss), "rec": self.mean(self.rec), "kl": self.mean(self.kl),
            "beta": beta, "lr": lr, "tokens_per_sec": self.tokens_per_sec(),
        })
    }
}
