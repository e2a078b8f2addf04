//! The training loop: Adam on rec + beta * KL term (free bits, target rate) + the optional
//! bag-of-words loss, with word dropout and gradient-norm clipping; per-epoch validation with the
//! evaluation code (ELBO, the training objective at its final beta, greedy reconstruction);
//! the weights kept by the criterion the user chose; the learning rate cooled over the end of
//! the budget, or halved on a plateau of that criterion once beta has settled. Checkpoints (at
//! epoch ends and every --save-every minutes) hold the weights, Adam's state and the place in
//! the epoch, and each step's noise is seeded by the step, so a run killed at any moment resumes
//! exactly where it saved. When the run ends, the prior is fitted to the kept weights'
//! posteriors of the training sentences (`prior`) and stored with them.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use indicatif::ProgressBar;
use serde_json::json;
use tch::nn;
use tch::{Device, Kind};

use crate::checkpoint::{self as ckpt, CheckpointConfig, TrainState};
use crate::config::{LrSchedule, ModelConfig, Selection, TrainConfig};
use crate::data::{self, Batch, Encoded, Sentences};
use crate::eval::{evaluate_elbo, iw_nll, perplexity, ElboStats};
use crate::files::{self, DirLock};
use crate::latent::{self, reconstruction_score, Score};
use crate::loss::{
    beta_at, bow_nll, budget_progress, kl_per_dim, kl_term, kl_term_of_dim_means, linear_lr,
    word_dropout,
};
use crate::model::{BowHead, Pass, Vae, ZFrom};
use crate::optim::{Adam, StepControl, WeightAverage};
use crate::prior::{FitReport, Prior};
use crate::runtime;
use crate::sample::{Decoding, Strategy, DECODE_BATCH};
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
    /// Test hook: the loss of these steps (0-based) is made NaN, as a diverging run's would be.
    #[doc(hidden)]
    pub poison_steps: Vec<u64>,
    /// Test hook: stop as Ctrl-C would once this many steps are done.
    #[doc(hidden)]
    pub stop_at_step: Option<u64>,
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
    /// The characters of more than one byte in the training sentences ([`data::characters`]).
    characters: String,
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
            let (t, v) = data::split_valid(corpus.lines, cfg.valid_share, cfg.seed);
            let heldout = Some(v.clone());
            (t, v, heldout)
        }
    };
    if corpus.blank_skipped > 0 {
        log(&format!("skipped {} blank lines", corpus.blank_skipped));
    }
    let characters = data::characters(&train_lines);
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
        "the corpus has {} usable training sentence(s), fewer than one batch of {} (lower --batch-size or use a larger corpus)",
        train.seqs.len(),
        cfg.batch_size
    );
    ensure!(!valid.seqs.is_empty(), "no usable validation sentences");
    Ok(Prepared {
        tokenizer,
        characters,
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
    let mut t = Trainer::open(req)?;
    t.log_plan();
    let mut stopped_by = StopReason::Epochs;
    let mut last_valid = ElboStats::default();
    while t.state.epoch < t.cfg.epochs {
        let interrupted = t.train_epoch(stop)?;
        last_valid = t.end_epoch(interrupted.is_some())?;
        if let Some(reason) = interrupted {
            stopped_by = reason;
            break;
        }
    }
    t.fit_prior()?;
    if stopped_by == StopReason::Interrupted {
        log(&format!(
            "interrupted: checkpoint saved in {}",
            t.dir.display()
        ));
    }
    Ok(TrainSummary {
        dir: t.dir,
        state: t.state,
        valid: last_valid,
        stopped_by,
    })
}

/// A training run in progress: the model, its optimiser and data, where the run stands, and the
/// directory it saves into (locked while it exists).
struct Trainer<'a> {
    req: &'a TrainRequest,
    dir: PathBuf,
    _lock: DirLock,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    prep: Prepared,
    vs: nn::VarStore,
    vae: Vae,
    bow: Option<BowHead>,
    opt: Adam,
    /// The weights' moving average (--ema-decay), what validation judges and the model keeps.
    average: Option<WeightAverage>,
    state: TrainState,
    metrics: ckpt::MetricsLog,
    /// A new model's files, written with its first checkpoint: with --force the old model stays
    /// whole until then.
    new_model: Option<NewModel>,
    started: Instant,
    /// Seconds the run had trained before this invocation.
    elapsed_before: f64,
    /// When the last checkpoint was saved, for --save-every.
    last_save: Instant,
    /// Non-finite steps in a row, on the device.
    skips: SkipRun,
    /// Steps in the run's epoch budget, for the linear schedule.
    total_steps: u64,
    /// Token count of each training sentence, what the batches are bucketed by.
    lengths: Vec<usize>,
}

impl<'a> Trainer<'a> {
    fn open(req: &'a TrainRequest) -> Result<Self> {
        let dir = req
            .out
            .clone()
            .unwrap_or_else(|| default_out_dir(&req.corpus));
        let started = Instant::now();
        // A directory that exists is locked before anything in it is read; a new one once the
        // corpus has been read, so that a mistyped corpus leaves no directory behind.
        let lock = dir.is_dir().then(|| lock_dir(&dir)).transpose()?;
        let replacing = !req.resume && holds_model(&dir);
        let (model_cfg, cfg, resume_tok, state) = open_run(req, &dir)?;
        cfg.validate()?;
        let prep = prepare(req, &cfg, resume_tok)?;
        let mut model_cfg = model_cfg;
        model_cfg.vocab_size = prep.tokenizer.vocab_size();
        model_cfg.validate()?;
        let need = TrainingMemory::estimate(&model_cfg, &cfg, &prep.train.seqs);
        need.check(runtime::available_memory(req.device))?;
        let lock = match lock {
            Some(lock) => lock,
            None => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                lock_dir(&dir)?
            }
        };
        tch::manual_seed(step_seed(cfg.seed, 0));
        let vs = nn::VarStore::new(req.device);
        let mut vae = Vae::new(vs.root(), &model_cfg);
        vae.train_kind = runtime::matmul_kind(cfg.precision, req.device);
        let bow = (cfg.bow_weight > 0.0).then(|| BowHead::new(vs.root() / "bow", &model_cfg));
        let opt = Adam::new(&vs)
            .with_weight_decay(cfg.weight_decay, |_| true)
            .with_weight_decay(cfg.encoder_weight_decay.max(cfg.weight_decay), |name| {
                name.starts_with("encoder.")
            });
        let average = (cfg.ema_decay > 0.0).then(|| WeightAverage::new(&vs, cfg.ema_decay));
        let mut t = Self {
            req,
            // Writes nothing until `resume` or `start_new` says what the log holds.
            metrics: ckpt::MetricsLog::new(&dir, false),
            dir,
            _lock: lock,
            total_steps: 0,
            lengths: prep.train.seqs.lengths(),
            cfg,
            model_cfg,
            prep,
            vs,
            vae,
            bow,
            opt,
            average,
            state,
            new_model: None,
            started,
            elapsed_before: 0.0,
            last_save: Instant::now(),
            skips: SkipRun::new(req.device),
        };
        if req.resume {
            t.resume()?;
        } else {
            t.start_new(replacing)?;
        }
        t.elapsed_before = t.state.elapsed_secs;
        t.total_steps = (t.cfg.epochs * t.epoch_batches(0).len()) as u64;
        t.check_budget_left()?;
        Ok(t)
    }

    /// Loads the resume point: weights, the optimiser's state and the training state saved with
    /// them, and the metrics log up to that step.
    fn resume(&mut self) -> Result<()> {
        let path = self.dir.join(ckpt::LAST_WEIGHTS);
        let point = ckpt::read_resume_point(&path)?;
        ckpt::load_variables(&self.vs, &point.tensors, &path)?;
        if let Some(saved) = point.state {
            // The file's own state: state.json may be a save behind it after a kill, and is
            // brought level so that it says where the run resumed.
            self.state = saved;
            ckpt::write_json(&self.dir.join(ckpt::STATE), &self.state)?;
        }
        let mut config: CheckpointConfig = ckpt::read_json(&self.dir.join(ckpt::CONFIG))?;
        if self.cfg.lr != config.train.lr {
            // A new --lr replaces the rate where the plateau schedule had brought it.
            self.state.lr = self.cfg.lr;
        }
        if self.cfg != config.train {
            // The settings the run now trains with, so that a later --resume starts from them.
            config.train = self.cfg.clone();
            ckpt::write_json(&self.dir.join(ckpt::CONFIG), &config)?;
        }
        let characters = self.dir.join(ckpt::CHARACTERS);
        if !characters.exists() {
            // A run started before checkpoints kept their characters: its corpus is the one
            // checked above, so its characters are these.
            files::write_atomic(&characters, self.prep.characters.as_bytes())?;
        }
        let exact = self.opt.load_state(&point.tensors)?;
        if let Some(average) = &mut self.average {
            if !average.load_state(&point.tensors)? {
                log("the checkpoint has no weight average (--ema-decay was off): it starts at the weights");
            }
        }
        let (metrics, dropped) = ckpt::MetricsLog::resume(&self.dir, self.state.step)?;
        self.metrics = metrics;
        let s = &self.state;
        log(&format!(
            "resuming {} at epoch {}, batch {} of epoch {}, step {}, lr {:.2e}{}{}",
            self.dir.display(),
            s.epoch,
            s.batch_in_epoch,
            s.epoch + 1,
            s.step,
            s.lr,
            if exact {
                ""
            } else {
                "; the checkpoint has no optimiser state (an older textvae wrote it): Adam's moments start from zero"
            },
            if dropped > 0 {
                format!("; {dropped} metrics records past that step dropped (trained again)")
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// A new run's files: written now, or with --force at the first checkpoint.
    fn start_new(&mut self, replacing: bool) -> Result<()> {
        let files = NewModel {
            config: CheckpointConfig {
                textvae_version: crate::VERSION.to_string(),
                libtorch_version: crate::LIBTORCH_VERSION.to_string(),
                tokenizer: self.prep.tokenizer.kind().to_string(),
                corpus: self.req.corpus.display().to_string(),
                corpus_digest: Some(files::digest(&self.req.corpus)?),
                valid: self.req.valid.as_ref().map(|v| v.display().to_string()),
                valid_digest: self.req.valid.as_deref().map(files::digest).transpose()?,
                model: self.model_cfg.clone(),
                train: self.cfg.clone(),
            },
            heldout: self.prep.heldout.clone(),
            characters: self.prep.characters.clone(),
        };
        if replacing {
            log(&format!(
                "--force: the model in {} is replaced when this run saves its first checkpoint",
                self.dir.display()
            ));
            self.new_model = Some(files);
        } else {
            files.install(&self.dir, &self.prep.tokenizer)?;
        }
        self.metrics = ckpt::MetricsLog::new(&self.dir, !replacing);
        Ok(())
    }

    /// The budget is the run's, not this invocation's: a resumed run has what its earlier parts
    /// left of --max-minutes and --epochs.
    fn check_budget_left(&self) -> Result<()> {
        let s = &self.state;
        ensure!(
            s.epoch < self.cfg.epochs && self.budget().is_none_or(|b| s.elapsed_secs < b),
            "{} has already had its budget ({} of {} epochs, {:.1} minutes{}): raise --epochs or --max-minutes to train on",
            self.dir.display(),
            s.epoch,
            self.cfg.epochs,
            s.elapsed_secs / 60.0,
            self.cfg
                .max_minutes
                .map_or_else(String::new, |m| format!(" of {m}"))
        );
        Ok(())
    }

    fn budget(&self) -> Option<f64> {
        self.cfg.max_minutes.map(|m| m * 60.0)
    }

    fn run_secs(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// The batches of epoch `epoch` (0-based), as sentence indices. Each epoch's shuffle is
    /// seeded by the epoch, so a resumed run sees the batches it would have seen without the
    /// interruption.
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut rng = crate::seeded_rng(self.cfg.seed.wrapping_add(epoch as u64));
        data::bucket_batches(&self.lengths, self.cfg.batch_size, &mut rng)
    }

    /// The run's data, model and objective in the log.
    fn log_plan(&self) {
        let params: i64 = self
            .vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        let preview = self.epoch_batches(self.state.epoch);
        let prep = &self.prep;
        log(&format!(
            "training {} on {}: {} sentences ({} tokens), validation {} sentences; {} tokenizer, {} tokens; {:.1}M parameters; padding {:.1}% of batch positions; device {}, {} threads, matrix products in {} (--precision {})",
            self.dir.display(),
            self.req.corpus.display(),
            prep.train.seqs.len(),
            prep.train.seqs.total_tokens(),
            prep.valid.seqs.len(),
            prep.tokenizer.kind(),
            self.model_cfg.vocab_size,
            params as f64 / 1e6,
            100.0 * data::padding_share(&self.lengths, &preview),
            crate::runtime::device_name(self.req.device),
            tch::get_num_threads(),
            runtime::precision_name(self.vae.train_kind),
            self.cfg
                .precision
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_string()),
        ));
        log(&objective_plan(&self.cfg));
        log(&lr_plan(&self.cfg));
    }

    /// Trains the rest of the current epoch. Some(reason) when it stopped early (interrupt or
    /// time budget), None when the epoch ran to its end.
    fn train_epoch(&mut self, stop: &AtomicBool) -> Result<Option<StopReason>> {
        let epoch = self.state.epoch + 1;
        let batches = self.epoch_batches(self.state.epoch);
        let bar = progress_bar(std::io::stderr().is_terminal(), batches.len() as u64, epoch);
        let start = self.state.batch_in_epoch.min(batches.len());
        if let Some(bar) = &bar {
            bar.set_position(start as u64);
        }
        let mut window = Window::new(self.req.device);
        let mut stopped = None;
        for idx in &batches[start..] {
            let beta = runtime::catch_torch(|| self.train_step(idx, &mut window))
                .map_err(|e| self.step_error(e, idx))?;
            self.state.batch_in_epoch += 1;
            if let Some(bar) = &bar {
                bar.inc(1);
            }
            if self.state.step.is_multiple_of(self.cfg.log_every) {
                self.drain(&mut window)?;
                self.metrics
                    .append(&window.record(self.state.step, epoch, beta, self.state.lr))?;
                match &bar {
                    Some(bar) => bar.set_message(window.message(beta)),
                    None => log(&format!(
                        "epoch {epoch} step {} {}",
                        self.state.step,
                        window.message(beta)
                    )),
                }
                window = Window::new(self.req.device);
            }
            if stop.load(Ordering::SeqCst) || self.req.stop_at_step == Some(self.state.step) {
                stopped = Some(StopReason::Interrupted);
            } else if self.budget().is_some_and(|b| self.run_secs() >= b) {
                stopped = Some(StopReason::TimeBudget);
            }
            if stopped.is_some() {
                break;
            }
            if self.save_due() && self.state.batch_in_epoch < batches.len() {
                self.drain(&mut window)?;
                self.save_resume_point()?;
            }
        }
        // The last steps' skips count in the state (and may stop the run) before anything is
        // saved; a window cut short by the epoch's end is not a metrics record.
        self.drain(&mut window)?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok(stopped)
    }

    /// Reads the device's account of the steps since the last drain, the one wait for the device
    /// in a logging window: the window's sums move to the host, skipped steps are counted and
    /// logged, and a run of --max-nonfinite of them stops training.
    fn drain(&mut self, window: &mut Window) -> Result<()> {
        let (skipped, diverged_at) = window.drain(&self.skips)?;
        if skipped == 0 {
            return Ok(());
        }
        self.state.skipped_steps += skipped;
        log(&format!(
            "{skipped} of the steps up to step {} skipped: loss or gradient not finite",
            self.state.step
        ));
        ensure!(
            diverged_at == 0,
            "training diverged: {} steps in a row up to step {diverged_at} had a non-finite loss or gradient (lower --lr?); {}",
            self.cfg.max_nonfinite,
            self.what_is_kept()
        );
        Ok(())
    }

    /// What a run stopped by divergence leaves behind, in words.
    fn what_is_kept(&self) -> String {
        if self.dir.join(ckpt::LAST_WEIGHTS).is_file() {
            format!("the last checkpoint in {} is kept", self.dir.display())
        } else {
            "no checkpoint had been saved yet".to_string()
        }
    }

    /// One optimiser step on the batch of sentences `idx`; returns the step's beta.
    fn train_step(&mut self, idx: &[usize], window: &mut Window) -> Result<f64> {
        let cfg = &self.cfg;
        let rows: Vec<&[u32]> = idx.iter().map(|&i| self.prep.train.seqs.get(i)).collect();
        let batch = Batch::new(&rows, self.req.device);
        if cfg.ae_steps > 0 && self.state.step == cfg.ae_steps {
            reinit_decoder(&self.vs, &self.model_cfg)?;
            // Adam's moments belong to the old decoder: start them afresh.
            self.opt.reset();
            if let Some(average) = &mut self.average {
                average.reset();
            }
            log(&format!(
                "step {}: autoencoder pretraining done; decoder re-initialised, KL schedule starts",
                self.state.step
            ));
        }
        if cfg.lr_schedule == LrSchedule::Linear {
            let p = budget_progress(
                self.run_secs(),
                self.budget(),
                self.state.step,
                self.total_steps,
            );
            self.state.lr = linear_lr(cfg.lr, cfg.min_lr, cfg.lr_cooldown, p);
        }
        // The noise of each step (word dropout, z, dropout) is a function of the step alone,
        // so a resumed run draws what the uninterrupted one would have.
        tch::manual_seed(step_seed(cfg.seed, self.state.step));
        let beta = beta_at(&cfg.kl_schedule, cfg.ae_steps, self.state.step);
        let (mut loss, rec, kl) = batch_loss(&self.vae, self.bow.as_ref(), &batch, cfg, beta);
        if self.req.poison_steps.contains(&self.state.step) {
            loss *= f64::NAN;
        }
        let kl = kl
            .sum_dim_intlist([1].as_slice(), false, Kind::Float)
            .mean(Kind::Float);
        let ctl = optimiser_step(&mut self.opt, &loss, cfg.clip_norm, self.state.lr)?;
        self.state.step += 1;
        if let Some(average) = &mut self.average {
            average.update(self.state.step);
        }
        window.add(&[&loss, &rec, &kl], &ctl.skip, batch.n_tokens);
        self.skips
            .add(&ctl.skip, self.state.step, cfg.max_nonfinite);
        Ok(beta)
    }

    /// What a failed step says: which step and batch, and for running out of memory what to lower.
    fn step_error(&self, err: anyhow::Error, idx: &[usize]) -> anyhow::Error {
        let longest = idx.iter().map(|&i| self.lengths[i]).max().unwrap_or(0);
        let hint = match (
            runtime::is_out_of_memory(&err),
            self.dir.join(ckpt::LAST_WEIGHTS).exists(),
        ) {
            (true, true) => "; lower --batch-size or --max-len (the last checkpoint is kept)",
            (true, false) => "; lower --batch-size or --max-len",
            (false, _) => "",
        };
        err.context(format!(
            "training step {} failed (a batch of {} sentences, the longest {longest} tokens){hint}",
            self.state.step + 1,
            idx.len()
        ))
    }

    /// Whether --save-every says a checkpoint within the epoch is due. Not before this run's
    /// model is in the directory: a --force run leaves the old one whole until its first epoch.
    fn save_due(&self) -> bool {
        self.cfg.save_every > 0.0
            && self.new_model.is_none()
            && self.last_save.elapsed().as_secs_f64() >= self.cfg.save_every * 60.0
    }

    /// A checkpoint within an epoch: what --resume needs, no validation.
    fn save_resume_point(&mut self) -> Result<()> {
        self.state.elapsed_secs = self.run_secs();
        let mut optimiser = self.opt.named_state();
        if let Some(average) = &self.average {
            optimiser.extend(average.named_state());
        }
        ckpt::save_resume_point(
            &self.dir.join(ckpt::LAST_WEIGHTS),
            &self.vs,
            optimiser,
            &self.state,
        )?;
        ckpt::write_json(&self.dir.join(ckpt::STATE), &self.state)?;
        self.last_save = Instant::now();
        Ok(())
    }

    /// The end of a run: the prior fitted to the kept weights' posteriors of the training
    /// sentences, saved with them (--prior-components; a Ctrl-C during the fit leaves them with
    /// N(0, I)).
    fn fit_prior(&mut self) -> Result<()> {
        let path = self.dir.join(ckpt::WEIGHTS);
        if self.cfg.prior_components == 0 || !path.is_file() {
            return Ok(());
        }
        let started = Instant::now();
        // Training is over and last.safetensors holds where --resume continues: the live
        // variables can take the kept weights.
        ckpt::load_variables(&self.vs, &ckpt::read_tensors(&path)?, &path)?;
        let report = install_prior(
            &mut self.vae,
            &self.vs,
            &self.prep.train.seqs,
            self.cfg.prior_components,
            self.cfg.seed,
            &path,
        )?;
        let kls = latent::mean_kls(&self.vae, &self.prep.valid.seqs, self.req.device);
        if let Some(report) = report {
            log(&prior_message(
                &report,
                kls,
                started.elapsed().as_secs_f64(),
            ));
        }
        Ok(())
    }

    /// Validation, model selection, the plateau schedule and the checkpoint at the end of an
    /// epoch, or where an interrupted one stopped (`partial`).
    fn end_epoch(&mut self, partial: bool) -> Result<ElboStats> {
        let epoch = self.state.epoch + 1;
        if !partial {
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
        }
        // With --ema-decay the variables hold the average while it is judged and kept, and the
        // weights themselves again before the resume point, whatever happened in between.
        self.swap_average();
        let judged = self.judge_and_keep(epoch, partial);
        self.swap_average();
        let v = judged?;
        self.metrics
            .append(&v.record(epoch, &self.state, partial))?;
        self.save_resume_point()?;
        if self.dir.join(ckpt::WEIGHTS).is_file() {
            // Recorded once a loadable model exists, so `generate` never finds a half-made one.
            ckpt::record_latest(&self.dir)?;
        }
        Ok(v.stats)
    }

    /// Exchanges the weights and their moving average, when there is one.
    fn swap_average(&mut self) {
        if let Some(average) = &mut self.average {
            average.swap();
        }
    }

    /// Validates the model the variables hold, updates the selection and plateau state, logs the
    /// epoch and saves the weights as the kept model when the criterion says so.
    fn judge_and_keep(&mut self, epoch: usize, partial: bool) -> Result<Validation> {
        let cfg = &self.cfg;
        let v = validate(
            &self.vae,
            &self.prep.valid.seqs,
            &self.prep.tokenizer,
            &self.prep.characters,
            cfg,
            self.req.device,
        )?;
        // Steps with a non-finite loss are skipped, so this is weights grown past float32's
        // range: training on from them only wastes the budget, and saving them loses the last
        // good resume point.
        ensure!(
            v.stats.neg_elbo.is_finite() && v.criterion.is_finite(),
            "training diverged: after step {} the validation ELBO is not finite (rec {}, KL {}): \
             the weights overflowed (lower --lr?); {}",
            self.state.step,
            v.stats.rec,
            v.stats.kl,
            self.what_is_kept()
        );
        let settled = cfg.settled_at().is_some_and(|s| self.state.step >= s);
        let state = &mut self.state;
        // The criterion is finite here: a run whose validation is not stops above.
        let improved = state.best_valid.is_none_or(|b| v.criterion < b - 1e-4);
        if improved {
            state.best_valid = Some(v.criterion);
            state.bad_epochs = 0;
        } else if !partial && settled && cfg.lr_schedule == LrSchedule::Plateau {
            // Before beta settles the objective is still moving under the model's feet: a
            // plateau then says nothing about the learning rate.
            state.bad_epochs += 1;
            if state.bad_epochs >= cfg.lr_patience {
                state.lr = (state.lr * cfg.lr_decay).max(cfg.min_lr);
                state.bad_epochs = 0;
            }
        }
        let keep = improved || cfg.select == Selection::Last;
        self.state.elapsed_secs = self.run_secs();
        log_epoch(epoch, partial, &v, &self.state, cfg, &self.model_cfg, keep);
        if let Some(files) = self.new_model.take() {
            files.install(&self.dir, &self.prep.tokenizer)?;
            self.metrics.start_writing()?;
        }
        if keep {
            ckpt::save_weights(&self.vs, &self.dir.join(ckpt::WEIGHTS))?;
        }
        Ok(v)
    }
}

/// Fits the prior of the model whose variables `vs` holds (`vae`) to the posteriors of `seqs`, a
/// mixture of `components` Gaussians (0: N(0, I)), and saves the weights with it to `path`.
/// Returns the fit's report (none for N(0, I)).
pub fn install_prior(
    vae: &mut Vae,
    vs: &nn::VarStore,
    seqs: &Sentences,
    components: usize,
    seed: u64,
    path: &Path,
) -> Result<Option<FitReport>> {
    let (prior, report) = if components == 0 {
        (Prior::Normal, None)
    } else {
        let (prior, report) = latent::fit_prior(vae, seqs, components, seed, vs.device())?;
        (prior, Some(report))
    };
    ckpt::save_model(vs, &prior, path)?;
    vae.prior = prior;
    Ok(report)
}

/// A fitted prior in words: the fit, and the KL of `kls` (to N(0, I) and to the mixture, per
/// sentence) on the validation sentences.
pub fn prior_message(report: &FitReport, kls: Option<(f64, f64)>, secs: f64) -> String {
    let valid = kls.map_or_else(String::new, |(normal, mixture)| {
        format!("; validation KL {mixture:.2} nats to it ({normal:.2} to N(0, I))")
    });
    format!(
        "prior: a mixture of {} Gaussians fitted to the posteriors of {} training sentences ({} EM iterations, {secs:.1} s); E_q[log p(z)] {:.2} nats per sentence (N(0, I): {:.2}){valid}",
        report.components,
        report.sentences,
        report.iterations,
        report.expected_log_prior,
        report.expected_log_normal,
    )
}

/// The seed of libtorch's generator at training step `step` of a run seeded `seed`: mixed, so
/// that runs seeded s and s + 1 do not draw the same noise a step apart.
fn step_seed(seed: u64, step: u64) -> i64 {
    (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step) as i64
}

/// What the run optimises and which weights it keeps, in words, for the log.
fn objective_plan(cfg: &TrainConfig) -> String {
    // A clause of the objective's description, present only when its setting is on.
    let clause = |on: bool, text: String| if on { text } else { String::new() };
    format!(
        "keeping the weights with the best {} (--select {}); objective rec + beta * KL term{}{}{}{}{}{}",
        cfg.select.describe(),
        cfg.select
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        clause(
            cfg.free_bits > 0.0,
            format!(", free bits {} nats/dim", cfg.free_bits)
        ),
        clause(
            cfg.target_kl > 0.0,
            format!(", target rate {} nats", cfg.target_kl)
        ),
        clause(
            cfg.bow_weight > 0.0,
            format!(" + {} * bag-of-words loss", cfg.bow_weight)
        ),
        clause(
            cfg.encoder_weight_decay > 0.0,
            format!(
                "; encoder weight decay {} (AdamW)",
                cfg.encoder_weight_decay
            )
        ),
        clause(
            cfg.weight_decay > 0.0,
            format!("; weight decay {} (AdamW)", cfg.weight_decay)
        ),
        clause(
            cfg.ema_decay > 0.0,
            format!(
                "; the weights' moving average (decay {}) is what is judged and kept",
                cfg.ema_decay
            )
        ),
    )
}

/// Locks the checkpoint directory `dir` for this run and clears the temporary files a killed
/// run may have left in it.
fn lock_dir(dir: &Path) -> Result<DirLock> {
    let lock = DirLock::acquire(dir)?;
    let stale = files::remove_stale_temps(dir)?;
    if stale > 0 {
        log(&format!(
            "removed {stale} temporary files an interrupted save left in {}",
            dir.display()
        ));
    }
    Ok(lock)
}

/// The configs, the tokenizer to keep (on --resume) and the state the run starts from: the
/// checkpoint's on --resume, the request's otherwise.
/// The least memory a training step can take, counted before anything is allocated, so that a
/// run which cannot fit is refused with the numbers instead of being killed by the kernel.
/// A lower bound: activations other than the output layer's are left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingMemory {
    pub parameters: i64,
    /// Weights, their gradients and Adam's two moments, in bytes.
    pub parameter_bytes: u64,
    /// Real tokens of the largest batch (batches hold sentences of similar length).
    pub batch_tokens: u64,
    /// The output layer of that batch: logits and their gradient, in bytes.
    pub output_bytes: u64,
}

impl TrainingMemory {
    pub fn estimate(model: &ModelConfig, cfg: &TrainConfig, seqs: &Sentences) -> Self {
        let v = model.vocab_size;
        let bow = if cfg.bow_weight > 0.0 {
            model.latent_dim * model.hidden_dim + model.hidden_dim + model.hidden_dim * v + v
        } else {
            0
        };
        let parameters = model.parameter_count() + bow;
        let mut lengths: Vec<u64> = seqs.iter().map(|s| s.len() as u64 + 1).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        let batch_tokens: u64 = lengths.iter().take(cfg.batch_size).sum();
        Self {
            parameters,
            // Weights, gradients and Adam's two moments, and the moving average when kept.
            parameter_bytes: parameters.max(0) as u64 * 4 * (4 + u64::from(cfg.ema_decay > 0.0)),
            batch_tokens,
            output_bytes: batch_tokens * v.max(0) as u64 * 4 * 2,
        }
    }

    pub fn total(&self) -> u64 {
        self.parameter_bytes + self.output_bytes
    }

    /// An error when `available` bytes (None: not known) cannot hold the estimate.
    pub fn check(&self, available: Option<u64>) -> Result<()> {
        let Some(available) = available else {
            return Ok(());
        };
        ensure!(
            self.total() <= available,
            "training needs at least {} of memory ({:.1}M parameters with their gradients and Adam's moments: {}; the output layer of the largest batch, {} tokens: {}), but {} is available: lower --batch-size, --max-len, --vocab-size or the model's dimensions",
            human_bytes(self.total()),
            self.parameters as f64 / 1e6,
            human_bytes(self.parameter_bytes),
            self.batch_tokens,
            human_bytes(self.output_bytes),
            human_bytes(available)
        );
        Ok(())
    }
}

/// Bytes as a reader says them: `1.5 GiB`, `12.0 MiB`.
fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    let b = b as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// Whether `dir` holds weights a new run would replace. A run that failed before its first save
/// leaves only its configuration and tokenizer, which the next run may simply overwrite.
fn holds_model(dir: &Path) -> bool {
    dir.join(ckpt::WEIGHTS).exists() || dir.join(ckpt::LAST_WEIGHTS).exists()
}

fn open_run(
    req: &TrainRequest,
    dir: &Path,
) -> Result<(ModelConfig, TrainConfig, Option<TextTokenizer>, TrainState)> {
    if !req.resume {
        if holds_model(dir) && !req.force {
            bail!(
                "{} already holds a model: continue it with --resume, replace it with --force, or choose --out",
                dir.display()
            );
        }
        let state = TrainState {
            lr: req.train.lr,
            ..Default::default()
        };
        return Ok((req.model.clone(), req.train.clone(), None, state));
    }
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
    check_same_data(req, &saved)?;
    let (model, train) = resumed_configs(req, &saved)?;
    let tok = TextTokenizer::load(&dir.join(ckpt::TOKENIZER))?;
    ckpt::check_tokenizer(&tok, &saved)?;
    if let TokenizerSpec::File(f) = &req.tokenizer {
        let given = TextTokenizer::load(f)?;
        ckpt::check_tokenizer(&given, &saved)
            .with_context(|| format!("--tokenizer {}", f.display()))?;
    }
    let state: TrainState = ckpt::read_json(&dir.join(ckpt::STATE))?;
    Ok((model, train, Some(tok), state))
}

/// What a resumed run may change: its budget, checkpointing, logging and the learning rate.
const RESUME_MAY_CHANGE: &[&str] = &[
    "epochs",
    "max_minutes",
    "save_every",
    "lr",
    "log_every",
    "max_nonfinite",
    "precision",
];

/// The configs a resumed run trains with: the saved model, and the saved training config with
/// what `RESUME_MAY_CHANGE` allows taken from the request (each change logged). Any other
/// setting the request changes is an error that names it.
fn resumed_configs(
    req: &TrainRequest,
    saved: &CheckpointConfig,
) -> Result<(ModelConfig, TrainConfig)> {
    let flag = |key: &str| format!("--{}", key.replace('_', "-"));
    let mut asked = req.model.clone();
    // Filled in from the tokenizer, never asked for.
    asked.vocab_size = saved.model.vocab_size;
    if let Some((key, was, now)) = changed_settings(&saved.model, &asked)?.first() {
        bail!(
            "--resume continues the run's model: {} {now} differs from its {was} (train a new model with --force or another --out)",
            flag(key)
        );
    }
    for (key, was, now) in changed_settings(&saved.train, &req.train)? {
        ensure!(
            RESUME_MAY_CHANGE.contains(&key.as_str()),
            "--resume continues the run as it was set up: {} {now} differs from its {was} (only {} may change)",
            flag(&key),
            RESUME_MAY_CHANGE.iter().map(|k| flag(k)).collect::<Vec<_>>().join(", ")
        );
        log(&format!("resuming with {} {now} (was {was})", flag(&key)));
    }
    Ok((saved.model.clone(), req.train.clone()))
}

/// The settings (serde keys) whose values differ between `a` and `b`, with both values.
fn changed_settings<T: serde::Serialize>(
    a: &T,
    b: &T,
) -> Result<Vec<(String, serde_json::Value, serde_json::Value)>> {
    let (a, b) = (serde_json::to_value(a)?, serde_json::to_value(b)?);
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        bail!("settings are not an object");
    };
    Ok(a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone(), b.get(k).cloned().unwrap_or_default()))
        .collect())
}

/// A resumed run must read the corpus and validation sentences it started with: a changed file
/// would silently change what "epoch" and "validation" mean.
fn check_same_data(req: &TrainRequest, saved: &CheckpointConfig) -> Result<()> {
    if let Some(digest) = &saved.corpus_digest {
        ensure!(
            &files::digest(&req.corpus)? == digest,
            "cannot resume: {} is not the corpus this run trained on ({}, {digest})",
            req.corpus.display(),
            saved.corpus
        );
    }
    if saved.corpus_digest.is_none() {
        // Written before digests were kept: nothing to compare.
        return Ok(());
    }
    match (&req.valid, &saved.valid, &saved.valid_digest) {
        (None, None, _) => Ok(()),
        (Some(v), Some(_), Some(digest)) if &files::digest(v)? == digest => Ok(()),
        (Some(v), _, _) => bail!(
            "cannot resume: --valid {} is not what this run validated on ({})",
            v.display(),
            saved
                .valid
                .as_deref()
                .unwrap_or("sentences split off the corpus: resume without --valid")
        ),
        (None, Some(v), _) => bail!("cannot resume: this run validated on {v}: give --valid {v}"),
    }
}

/// The files that make a new run's directory a model, written once (at the start, or with
/// --force at its first checkpoint).
struct NewModel {
    config: CheckpointConfig,
    /// The held-out sentences when they were split off the corpus.
    heldout: Option<Vec<String>>,
    /// The training sentences' characters, which decoding may complete.
    characters: String,
}

impl NewModel {
    /// Replaces whatever model `dir` held by this run's config and tokenizer. The old weights go
    /// first, so a kill half-way leaves an incomplete checkpoint (an error on loading), never
    /// old weights read through a new tokenizer.
    fn install(self, dir: &Path, tokenizer: &TextTokenizer) -> Result<()> {
        for old in [
            ckpt::WEIGHTS,
            ckpt::LAST_WEIGHTS,
            ckpt::STATE,
            ckpt::HELDOUT,
            ckpt::METRICS,
            ckpt::CHARACTERS,
        ] {
            let p = dir.join(old);
            if p.exists() {
                std::fs::remove_file(&p)
                    .with_context(|| format!("removing old {}", p.display()))?;
            }
        }
        ckpt::write_json(&dir.join(ckpt::CONFIG), &self.config)?;
        tokenizer.save(&dir.join(ckpt::TOKENIZER))?;
        files::write_atomic(&dir.join(ckpt::CHARACTERS), self.characters.as_bytes())?;
        if let Some(lines) = &self.heldout {
            // Kept so that the model can be evaluated on exactly the sentences it never saw.
            files::write_atomic(
                &dir.join(ckpt::HELDOUT),
                (lines.join("\n") + "\n").as_bytes(),
            )?;
        }
        Ok(())
    }
}

/// Backpropagates `loss` and applies the optimiser step at `lr` with the global gradient norm
/// clipped to `clip` (as tch's `clip_grad_norm`) — unless the loss or the gradient norm is not
/// finite: then the weights stay as they were. Decided on the device, with no wait for it; the
/// returned control's `skip` says which it was.
fn optimiser_step(opt: &mut Adam, loss: &tch::Tensor, clip: f64, lr: f64) -> Result<StepControl> {
    let grads = opt.gradients(loss)?;
    let norms: Vec<tch::Tensor> = grads
        .iter()
        .filter(|g| g.defined())
        .map(|g| g.norm())
        .collect();
    let ctl = StepControl::clip_or_skip(&tch::Tensor::stack(&norms, 0).norm(), loss, clip);
    opt.step(&grads, lr, &ctl)?;
    Ok(ctl)
}

/// The learning-rate schedule in words, for the log.
fn lr_plan(cfg: &TrainConfig) -> String {
    let start = cfg.lr;
    match cfg.lr_schedule {
        LrSchedule::Linear => format!(
            "learning rate {start:.2e}, decaying linearly to {:.0e} over the last {:.0}% of the budget ({}{} epochs, whichever ends first) (--lr-schedule linear)",
            cfg.min_lr.min(start),
            cfg.lr_cooldown * 100.0,
            cfg.max_minutes.map_or_else(String::new, |m| format!("{m} minutes or ")),
            cfg.epochs
        ),
        LrSchedule::Plateau => format!(
            "learning rate {start:.2e}, halved after {} epochs without a better criterion once beta has settled (--lr-schedule plateau)",
            cfg.lr_patience
        ),
    }
}

/// The training objective on one batch at `beta`: (loss, mean reconstruction NLL, KL per
/// dimension [B, Z]). Word dropout on the decoder inputs, one sample of z, the KL term with free
/// bits and the target rate, and the bag-of-words loss when there is a head for it.
fn batch_loss(
    vae: &Vae,
    bow: Option<&BowHead>,
    batch: &Batch,
    cfg: &TrainConfig,
    beta: f64,
) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
    let inputs = word_dropout(&batch.inputs, cfg.word_dropout, true);
    let out = vae.forward(batch, &inputs, Pass::Train, ZFrom::Sample);
    let kl = kl_per_dim(&out.mu, &out.logvar); // [B, Z]
    let rec = out.rec.mean(Kind::Float);
    let mut loss = &rec + beta * kl_term(&kl, cfg.free_bits, cfg.target_kl);
    if let Some(bow) = bow {
        let bow_loss = bow_nll(&bow.forward(&out.z), &batch.targets).mean(Kind::Float);
        loss += cfg.bow_weight * bow_loss;
    }
    (loss, rec, kl)
}

/// Li et al. 2019's second phase: the decoder's weights are drawn afresh as a new model's would
/// be, so it learns to read the pretrained encoder's code instead of inheriting an autoencoder's
/// habits. The encoder, the bag-of-words head and an embedding matrix the encoder shares stay.
fn reinit_decoder(vs: &nn::VarStore, cfg: &ModelConfig) -> Result<()> {
    let fresh = nn::VarStore::new(vs.device());
    let _ = Vae::new(fresh.root(), cfg);
    let fresh = fresh.variables();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let shared = cfg.share_embeddings && name == "decoder.emb.weight";
            if !name.starts_with("decoder.") || shared {
                continue;
            }
            let new = fresh.get(&name).with_context(|| {
                format!("re-initialising the decoder: no {name} in a new model")
            })?;
            var.copy_(new);
        }
        Ok(())
    })
}

/// What one epoch's validation measured.
struct Validation {
    stats: ElboStats,
    /// rec + final beta * KL term, as the training objective weighs them.
    objective: f64,
    /// The value the selection criterion compares (lower is better).
    criterion: f64,
    /// Greedy reconstruction of (up to `RECONSTRUCTED`) validation sentences.
    rec: Score,
}

/// Validation sentences decoded each epoch for the reconstruction score: enough to read a
/// percentage off, few enough to cost a second or two.
const RECONSTRUCTED: usize = 1000;
/// Sentences and importance samples of `--select nll`.
const NLL_SENTENCES: usize = 500;
const NLL_SAMPLES: usize = 20;

fn validate(
    vae: &Vae,
    seqs: &Sentences,
    tok: &TextTokenizer,
    characters: &str,
    cfg: &TrainConfig,
    device: Device,
) -> Result<Validation> {
    // Validation's batches and the training steps after it differ in shape: neither keeps the
    // other's freed blocks.
    runtime::release_free_memory();
    let stats = evaluate_elbo(vae, seqs, cfg.batch_size.max(64), device)?;
    let kl_dims = tch::Tensor::from_slice(&stats.kl_dims);
    let kl = kl_term_of_dim_means(&kl_dims, cfg.free_bits, cfg.target_kl).double_value(&[]);
    let objective = stats.rec + cfg.kl_schedule.final_beta() * kl;
    let criterion = match cfg.select {
        Selection::Objective | Selection::Last => objective,
        Selection::Elbo => stats.neg_elbo,
        Selection::Nll => {
            // Spread, not the first ones: a corpus sorted by length would be judged by its
            // shortest sentences.
            let some = seqs.spread(NLL_SENTENCES);
            iw_nll(vae, &some, NLL_SAMPLES, cfg.batch_size.max(64), device)
        }
    };
    let decoding =
        Decoding::new(Strategy::Greedy, cfg.max_len).for_tokenizer(tok, Some(characters));
    let some = seqs.spread(RECONSTRUCTED);
    let rec = reconstruction_score(vae, &some, &decoding, DECODE_BATCH, device)?;
    runtime::release_free_memory();
    Ok(Validation {
        stats,
        objective,
        criterion,
        rec,
    })
}

impl Validation {
    fn record(&self, epoch: usize, state: &TrainState, partial: bool) -> serde_json::Value {
        let s = &self.stats;
        json!({
            "kind": "epoch", "epoch": epoch, "step": state.step, "lr": state.lr,
            "partial": partial,
            "valid_rec": s.rec, "valid_kl": s.kl, "valid_elbo": s.neg_elbo, "valid_au": s.au,
            "valid_objective": self.objective, "valid_criterion": self.criterion,
            "valid_rec_acc": self.rec.token_accuracy, "valid_rec_exact": self.rec.exact_match,
            "valid_rec_bleu": self.rec.bleu,
            "elapsed_secs": state.elapsed_secs,
        })
    }
}

fn log_epoch(
    epoch: usize,
    partial: bool,
    v: &Validation,
    state: &TrainState,
    train_cfg: &TrainConfig,
    model_cfg: &ModelConfig,
    kept: bool,
) {
    let s = &v.stats;
    log(&format!(
        "epoch {epoch}{}: valid rec {:.2} kl {:.2} elbo {:.2} (nats/sentence), ppl(elbo) {}, active units {}/{}; greedy reconstruction of {} sentences: token accuracy {:.3}, exact {:.3}, BLEU {:.1}; {} {:.2}{}; lr {:.2e}; {:.0}s",
        if partial { " (partial)" } else { "" },
        s.rec,
        s.kl,
        s.neg_elbo,
        readable(perplexity(s.neg_elbo * s.sentences as f64, s.tokens)),
        s.au,
        model_cfg.latent_dim,
        v.rec.sentences,
        v.rec.token_accuracy,
        v.rec.exact_match,
        v.rec.bleu,
        train_cfg.select.describe(),
        v.criterion,
        if kept { ": saved" } else { "" },
        state.lr,
        state.elapsed_secs,
    ));
}

/// A number for the log: one decimal while it is of a size one reads, scientific beyond (an
/// untrained model's perplexity has 160 digits).
fn readable(x: f64) -> String {
    if x.abs() < 1e6 {
        format!("{x:.1}")
    } else {
        format!("{x:.3e}")
    }
}

fn progress_bar(terminal: bool, len: u64, epoch: usize) -> Option<ProgressBar> {
    // The template is built only where a bar is drawn.
    terminal.then(|| {
        let template =
            format!("epoch {epoch} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}}<{{eta}})");
        crate::progress::bar(&template, len)
    })
}

/// Running means over a logging window. The step's losses stay on the device, summed there, and
/// come back once per window (`drain`), so a step never waits for the device.
struct Window {
    start: Instant,
    steps: usize,
    tokens: usize,
    /// Drained sums over the applied steps: loss, rec, kl; and the skipped steps.
    loss: f64,
    rec: f64,
    kl: f64,
    skipped: u64,
    /// The same four sums since the last drain, on the device: [4].
    pending: tch::Tensor,
}

impl Window {
    fn new(device: Device) -> Self {
        Self {
            start: Instant::now(),
            steps: 0,
            tokens: 0,
            loss: 0.0,
            rec: 0.0,
            kl: 0.0,
            skipped: 0,
            pending: tch::Tensor::zeros([4], (Kind::Float, device)),
        }
    }

    /// One step's scalars (loss, rec, kl), counted unless the step was skipped (`skip` [1] is 1).
    fn add(&mut self, values: &[&tch::Tensor; 3], skip: &tch::Tensor, tokens: usize) {
        tch::no_grad(|| {
            let values: Vec<tch::Tensor> = values.iter().map(|t| t.detach().reshape([1])).collect();
            // masked_fill, not a product: a skipped step's NaN times 0 is still NaN.
            let values = tch::Tensor::cat(&values, 0)
                .to_kind(Kind::Float)
                .masked_fill(&skip.to_kind(Kind::Bool), 0.0); // [3]
            let _ = self
                .pending
                .g_add_(&tch::Tensor::cat(&[values, skip.shallow_clone()], 0));
        });
        self.steps += 1;
        self.tokens += tokens;
    }

    /// Moves the pending sums to the host, in the same read as `skips`' state: (steps skipped
    /// since the last drain, the step at which a run of them reached the limit or 0).
    fn drain(&mut self, skips: &SkipRun) -> Result<(u64, u64)> {
        let read = tch::Tensor::cat(&[&self.pending, &skips.run, &skips.diverged_at], 0)
            .to_kind(Kind::Double);
        let v = Vec::<f64>::try_from(&read)?;
        tch::no_grad(|| {
            let _ = self.pending.zero_();
        });
        self.loss += v[0];
        self.rec += v[1];
        self.kl += v[2];
        let skipped = v[3].round() as u64;
        self.skipped += skipped;
        Ok((skipped, v[5].round() as u64))
    }

    /// The mean of sum `x` over the steps counted; NaN (null in metrics.jsonl) when every step
    /// of the window was skipped, rather than a loss of 0 that no step had.
    fn mean(&self, x: f64) -> f64 {
        match (self.steps as u64).saturating_sub(self.skipped) {
            0 => f64::NAN,
            counted => x / counted as f64,
        }
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
            "skipped_steps": self.skipped,
        })
    }
}

/// Non-finite steps in a row, counted on the device across logging windows.
struct SkipRun {
    /// Skipped steps in a row ending at the last step: [1].
    run: tch::Tensor,
    /// The step at which a run first reached --max-nonfinite, 0 while none has: [1].
    diverged_at: tch::Tensor,
}

impl SkipRun {
    fn new(device: Device) -> Self {
        Self {
            run: tch::Tensor::zeros([1], (Kind::Float, device)),
            diverged_at: tch::Tensor::zeros([1], (Kind::Float, device)),
        }
    }

    /// Step `step` (1-based) was skipped where `skip` [1] is 1.
    fn add(&mut self, skip: &tch::Tensor, step: u64, limit: u64) {
        tch::no_grad(|| {
            let _ = self.run.g_add_scalar_(1.0).g_mul_(skip);
            let hit = self
                .run
                .ge(limit as f64)
                .logical_and(&self.diverged_at.eq(0.0));
            let _ = self.diverged_at.masked_fill_(&hit, step as f64);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_of_skipped_steps_has_no_mean_loss() {
        let mut skips = SkipRun::new(Device::Cpu);
        let mut window = Window::new(Device::Cpu);
        let one = tch::Tensor::ones([1], (Kind::Float, Device::Cpu));
        let nan = &one * f64::NAN;
        window.add(&[&nan, &nan, &nan], &one, 10);
        skips.add(&one, 1, 3);
        assert_eq!(window.drain(&skips).unwrap(), (1, 0));
        assert!(window.message(1.0).starts_with("loss NaN rec NaN kl NaN"));
        assert!(window.record(1, 1, 1.0, 1e-3)["loss"].is_null());
        let two = tch::Tensor::from_slice(&[2.0f32]);
        window.add(&[&two, &two, &two], &(&one * 0.0), 10);
        window.drain(&skips).unwrap();
        assert_eq!(window.record(2, 1, 1.0, 1e-3)["loss"], 2.0);
    }

    #[test]
    fn log_numbers_stay_readable() {
        assert_eq!(readable(122.66), "122.7");
        assert_eq!(readable(400f64.exp()), "5.221e173");
    }

    #[test]
    fn training_memory_counts_the_largest_batch_and_refuses_what_cannot_fit() {
        let model = ModelConfig {
            vocab_size: 1000,
            ..ModelConfig::default()
        };
        let cfg = TrainConfig {
            batch_size: 2,
            ..TrainConfig::default()
        };
        let rows: [&[u32]; 4] = [&[5; 3], &[5; 9], &[5; 4], &[5; 1]];
        let seqs: Sentences = rows.into_iter().collect();
        let m = TrainingMemory::estimate(&model, &cfg, &seqs);
        assert_eq!(m.batch_tokens, 10 + 5); // the two longest, each with its end token
        assert_eq!(m.output_bytes, 15 * 1000 * 8);
        assert_eq!(m.parameter_bytes, model.parameter_count() as u64 * 16);
        assert!(m.check(None).is_ok());
        assert!(m.check(Some(m.total())).is_ok());
        let e = m.check(Some(m.total() - 1)).unwrap_err().to_string();
        assert!(e.contains("lower --batch-size"), "{e}");
        assert!(e.contains("15 tokens"), "{e}");
    }

    #[test]
    fn step_seeds_differ_between_runs_and_steps() {
        assert_ne!(step_seed(1234, 1), step_seed(1235, 0));
        assert_ne!(step_seed(1234, 0), step_seed(1234, 1));
        assert_eq!(step_seed(7, 3), step_seed(7, 3));
    }
}
