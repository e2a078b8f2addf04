//! The training loop: Adam on rec + beta * KL term (free bits, target rate) + the optional
//! bag-of-words loss, with word dropout and gradient-norm clipping; per-epoch validation with the
//! evaluation code (ELBO, the training objective at its final beta, greedy reconstruction);
//! the weights kept by the criterion the user chose; the learning rate halved on a plateau of
//! that criterion only once beta has settled; atomic checkpoints so a run can be killed at any
//! moment and resumed.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind};

use crate::checkpoint::{self as ckpt, CheckpointConfig, TrainState};
use crate::config::{LrSchedule, ModelConfig, Selection, TrainConfig};
use crate::data::{self, Batch, Encoded};
use crate::eval::{evaluate_elbo, iw_nll, perplexity, ElboStats};
use crate::latent::{reconstruction_score, Score};
use crate::loss::{
    beta_at, bow_nll, budget_progress, kl_per_dim, kl_term, kl_term_of_dim_means, linear_lr,
    word_dropout,
};
use crate::model::{BowHead, Vae};
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
    let bow = (train_cfg.bow_weight > 0.0).then(|| BowHead::new(vs.root() / "bow", &model_cfg));
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

    // A clause of the objective's description, present only when its setting is on.
    let clause = |on: bool, text: String| if on { text } else { String::new() };
    log(&format!(
        "keeping the weights with the best {} (--select {}); objective rec + beta * KL term{}{}{}",
        train_cfg.select.describe(),
        train_cfg
            .select
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        clause(
            train_cfg.free_bits > 0.0,
            format!(", free bits {} nats/dim", train_cfg.free_bits)
        ),
        clause(
            train_cfg.target_kl > 0.0,
            format!(", target rate {} nats", train_cfg.target_kl)
        ),
        clause(
            train_cfg.bow_weight > 0.0,
            format!(" + {} * bag-of-words loss", train_cfg.bow_weight)
        ),
    ));
    let mut opt = nn::Adam::default().build(&vs, state.lr)?;
    let budget = train_cfg.max_minutes.map(|m| m * 60.0);
    // The budget is the run's, not this invocation's: a resumed run has what its earlier parts
    // left of --max-minutes and --epochs, and the linear schedule goes on from where it was.
    let total_steps = (train_cfg.epochs * preview.len()) as u64;
    let elapsed_before = state.elapsed_secs;
    let run_secs = || elapsed_before + started.elapsed().as_secs_f64();
    ensure!(
        state.epoch < train_cfg.epochs && budget.is_none_or(|b| elapsed_before < b),
        "{} has already had its budget ({} of {} epochs, {:.1} minutes{}): raise --epochs or --max-minutes to train on",
        dir.display(),
        state.epoch,
        train_cfg.epochs,
        elapsed_before / 60.0,
        train_cfg
            .max_minutes
            .map_or_else(String::new, |m| format!(" of {m}"))
    );
    log(&lr_plan(&train_cfg));
    let trainable = vs.trainable_variables();
    // Non-finite steps in a row.
    let mut bad_run = 0u64;
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
            if train_cfg.ae_steps > 0 && state.step == train_cfg.ae_steps {
                reinit_decoder(&vs, &model_cfg)?;
                // Adam's moments belong to the old decoder: start them afresh.
                opt = nn::Adam::default().build(&vs, state.lr)?;
                log(&format!(
                    "step {}: autoencoder pretraining done; decoder re-initialised, KL schedule starts",
                    state.step
                ));
            }
            if train_cfg.lr_schedule == LrSchedule::Linear {
                let p = budget_progress(run_secs(), budget, state.step, total_steps);
                state.lr = linear_lr(train_cfg.lr, train_cfg.min_lr, train_cfg.lr_cooldown, p);
                opt.set_lr(state.lr);
            }
            let beta = beta_at(&train_cfg.kl_schedule, train_cfg.ae_steps, state.step);
            let (mut loss, rec, kl) = batch_loss(&vae, bow.as_ref(), &batch, &train_cfg, beta);
            if req.poison_steps.contains(&state.step) {
                loss *= f64::NAN;
            }
            let applied = finite_step(&mut opt, &trainable, &loss, train_cfg.clip_norm)?;
            state.step += 1;
            if let Some(loss) = applied {
                bad_run = 0;
                window.add(
                    loss,
                    f64::try_from(&rec)?,
                    kl.sum_dim_intlist([1].as_slice(), false, Kind::Float)
                        .mean(Kind::Float)
                        .double_value(&[]),
                    batch.n_tokens,
                );
            } else {
                window.skipped += 1;
                bad_run += 1;
                skipped_step(&mut state, bad_run, &train_cfg, &dir)?;
            }
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
            if budget.is_some_and(|b| run_secs() >= b) {
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
        let v = validate(&vae, &prep.valid.seqs, &train_cfg, req.device);
        let settled = train_cfg.settled_at().is_some_and(|s| state.step >= s);
        let improved =
            v.criterion.is_finite() && state.best_valid.is_none_or(|b| v.criterion < b - 1e-4);
        if improved {
            state.best_valid = Some(v.criterion);
            state.bad_epochs = 0;
        } else if interrupted.is_none() && settled && train_cfg.lr_schedule == LrSchedule::Plateau {
            // Before beta settles the objective is still moving under the model's feet: a
            // plateau then says nothing about the learning rate.
            state.bad_epochs += 1;
            if state.bad_epochs >= train_cfg.lr_patience {
                state.lr = (state.lr * train_cfg.lr_decay).max(train_cfg.min_lr);
                opt.set_lr(state.lr);
                state.bad_epochs = 0;
            }
        }
        let keep = improved || train_cfg.select == Selection::Last;
        if keep {
            ckpt::save_weights(&vs, &dir.join(ckpt::WEIGHTS))?;
        }
        state.elapsed_secs = run_secs();
        log_epoch(
            epoch,
            interrupted.is_some(),
            &v,
            &state,
            &train_cfg,
            &model_cfg,
            keep,
        );
        ckpt::append_metrics(&dir, &v.record(epoch, &state, interrupted.is_some()))?;
        last_valid = v.stats;
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

/// Counts a step skipped for a non-finite loss or gradient, the `bad_run`-th in a row, and stops
/// training once the run of them reaches `--max-nonfinite`.
fn skipped_step(state: &mut TrainState, bad_run: u64, cfg: &TrainConfig, dir: &Path) -> Result<()> {
    state.skipped_steps += 1;
    log(&format!(
        "step {}: loss or gradient not finite, step skipped ({bad_run} in a row)",
        state.step
    ));
    let kept = if dir.join(ckpt::LAST_WEIGHTS).is_file() {
        format!("the last checkpoint in {} is kept", dir.display())
    } else {
        "no epoch had finished, so nothing was saved".to_string()
    };
    ensure!(
        bad_run < cfg.max_nonfinite,
        "training diverged: {bad_run} steps in a row up to step {} had a non-finite loss or gradient (lower --lr?); {kept}",
        state.step
    );
    Ok(())
}

/// Backpropagates `loss` and applies the optimiser step with the global gradient norm clipped
/// to `clip` (as tch's `clip_grad_norm`) — unless the loss or the gradient norm is not finite:
/// then the gradients are dropped and the weights stay as they were. The loss's value when the
/// step was applied, None when it was skipped.
fn finite_step(
    opt: &mut nn::Optimizer,
    vars: &[tch::Tensor],
    loss: &tch::Tensor,
    clip: f64,
) -> Result<Option<f64>> {
    opt.zero_grad();
    loss.backward();
    let grads: Vec<tch::Tensor> = vars
        .iter()
        .map(|v| v.grad())
        .filter(|g| g.defined())
        .collect();
    let norms: Vec<tch::Tensor> = grads.iter().map(|g| g.norm()).collect();
    let norm = f64::try_from(tch::Tensor::stack(&norms, 0).norm())?;
    let value = f64::try_from(loss)?;
    if !(norm.is_finite() && value.is_finite()) {
        opt.zero_grad();
        return Ok(None);
    }
    let coef = clip / (norm + 1e-6);
    if coef < 1.0 {
        tch::no_grad(|| {
            for mut g in grads {
                let _ = g.g_mul_scalar_(coef);
            }
        });
    }
    opt.step();
    Ok(Some(value))
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
    let out = vae.forward(&batch.targets, &batch.lengths, &inputs, true, true);
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

fn validate(vae: &Vae, seqs: &[Vec<i64>], cfg: &TrainConfig, device: Device) -> Validation {
    let stats = evaluate_elbo(vae, seqs, cfg.batch_size.max(64), device);
    let kl_dims = tch::Tensor::from_slice(&stats.kl_dims);
    let kl = kl_term_of_dim_means(&kl_dims, cfg.free_bits, cfg.target_kl).double_value(&[]);
    let objective = stats.rec + cfg.kl_schedule.final_beta() * kl;
    let criterion = match cfg.select {
        Selection::Objective | Selection::Last => objective,
        Selection::Elbo => stats.elbo,
        Selection::Nll => {
            let n = seqs.len().min(NLL_SENTENCES);
            iw_nll(vae, &seqs[..n], NLL_SAMPLES, cfg.batch_size.max(64), device)
        }
    };
    let decoding = Decoding::new(Strategy::Greedy, cfg.max_len);
    let n = seqs.len().min(RECONSTRUCTED);
    let rec = reconstruction_score(vae, &seqs[..n], &decoding, DECODE_BATCH, device);
    Validation {
        stats,
        objective,
        criterion,
        rec,
    }
}

impl Validation {
    fn record(&self, epoch: usize, state: &TrainState, partial: bool) -> serde_json::Value {
        let s = &self.stats;
        json!({
            "kind": "epoch", "epoch": epoch, "step": state.step, "lr": state.lr,
            "partial": partial,
            "valid_rec": s.rec, "valid_kl": s.kl, "valid_elbo": s.elbo, "valid_au": s.au,
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
        "epoch {epoch}{}: valid rec {:.2} kl {:.2} elbo {:.2} (nats/sentence), ppl(elbo) {:.1}, active units {}/{}; greedy reconstruction of {} sentences: token accuracy {:.3}, exact {:.3}, BLEU {:.1}; {} {:.2}{}; lr {:.2e}; {:.0}s",
        if partial { " (partial)" } else { "" },
        s.rec,
        s.kl,
        s.elbo,
        perplexity(s.elbo * s.sentences as f64, s.tokens),
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
    /// Steps skipped for a non-finite loss or gradient.
    skipped: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            skipped: 0,
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
            "skipped_steps": self.skipped,
        })
    }
}
