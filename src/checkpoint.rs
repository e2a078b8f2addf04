//! Checkpoints: a self-contained directory per model.
//!
//! ```text
//! config.json        model + training config, tokenizer kind, textvae and libtorch versions
//! model.safetensors  weights kept by the selection criterion (`--select`)
//! last.safetensors   where --resume continues from: weights at the last save, the optimiser's
//!                    moments and step, and the training state (as in state.json)
//! tokenizer.json     the tokenizer trained with the model
//! state.json         epoch, step (and batch within the epoch), best value of that criterion,
//!                    learning rate
//! metrics.jsonl      one JSON record per logging window and per epoch
//! heldout.txt        the held-out validation sentences, when no --valid file was given
//! characters.txt     the training sentences' characters of more than one byte, the only ones
//!                    decoding may complete (checkpoints made before 2026-11-29 have none)
//! ```
//!
//! Every file is written to a temporary name unique to the writer, synced and renamed into place
//! (`files::write_atomic`), so a kill or a full disk at any moment leaves the previous version
//! loadable. A training run holds the directory's `.lock` while it runs. The most recent run is
//! recorded in `LATEST` beside its directory; commands given no `--checkpoint` read
//! `checkpoints/LATEST`, where runs with the default `--out` record themselves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use crate::config::{ModelConfig, TrainConfig};
use crate::files::{write_atomic, write_atomic_with};
use crate::model::Vae;
use crate::prior::Prior;
use crate::sample::{Decoding, Strategy};
use crate::tokenizer::TextTokenizer;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const LAST_WEIGHTS: &str = "last.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";
pub const STATE: &str = "state.json";
pub const METRICS: &str = "metrics.jsonl";
/// Where `textvae plot` draws the curves of METRICS when not told otherwise.
pub const CURVES: &str = "curves.png";
pub const HELDOUT: &str = "heldout.txt";
pub const CHARACTERS: &str = "characters.txt";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const LATEST: &str = "LATEST";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointConfig {
    pub textvae_version: String,
    pub libtorch_version: String,
    pub tokenizer: String,
    pub corpus: String,
    /// `files::digest` of the corpus, so --resume can tell when it changed.
    #[serde(default)]
    pub corpus_digest: Option<String>,
    /// The --valid file, when one was given, and its digest.
    #[serde(default)]
    pub valid: Option<String>,
    #[serde(default)]
    pub valid_digest: Option<String>,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Completed epochs.
    pub epoch: usize,
    pub step: u64,
    pub best_valid: Option<f64>,
    pub lr: f64,
    /// Epochs since the selection criterion last improved.
    pub bad_epochs: usize,
    pub elapsed_secs: f64,
    /// Steps whose loss or gradient was not finite, skipped before they reached the weights.
    #[serde(default)]
    pub skipped_steps: u64,
    /// Batches of epoch `epoch + 1` already trained: where a run saved within an epoch resumes.
    #[serde(default)]
    pub batch_in_epoch: usize,
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn save_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    write_atomic_with(path, |tmp| {
        vs.save(tmp)
            .with_context(|| format!("writing weights {}", tmp.display()))
    })
}

/// Saves the weights with the model's prior beside them (a mixture's tensors under `prior.*`;
/// nothing more for N(0, I)), as one file replaced at once.
pub fn save_model(vs: &nn::VarStore, prior: &Prior, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.to_device(Device::Cpu)))
        .collect();
    tensors.extend(prior.tensors());
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(&tensors, tmp)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Every tensor of safetensors file `path`, by name (on the CPU).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading {} (corrupt?)", path.display()))?
        .into_iter()
        .collect())
}

/// Copies `tensors`, read from `path`, into the variables of `vs` by name, each checked for its
/// shape. Tensors the store has no variable for (the prior, the optimiser's state) are left to
/// their readers, so one read of a file serves all of them.
pub fn load_variables(
    vs: &nn::VarStore,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    for (name, mut var) in vs.variables() {
        let src = tensors.get(&name).with_context(|| {
            format!(
                "{} has no tensor {name} (corrupt, or from another model?)",
                path.display()
            )
        })?;
        ensure!(
            src.size() == var.size(),
            "{}: tensor {name} has shape {:?}, the model's has {:?} (from another model?)",
            path.display(),
            src.size(),
            var.size()
        );
        // `variables()` gives views of the store's own tensors: copying into one loads it.
        tch::no_grad(|| var.f_copy_(src))
            .with_context(|| format!("{}: loading tensor {name}", path.display()))?;
    }
    Ok(())
}

/// The prior among `tensors`, read from weights file `path`: N(0, I) unless they hold a fitted
/// mixture.
pub fn prior_in(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    latent_dim: i64,
    device: Device,
) -> Result<Prior> {
    let prior = Prior::from_tensors(tensors, latent_dim)
        .with_context(|| format!("reading the prior in {}", path.display()))?;
    Ok(prior.to_device(device))
}

/// The tensor of a resume point that holds its `TrainState`, as JSON bytes.
const STATE_TENSOR: &str = "textvae.state";

/// Saves where a run resumes from as one file, replaced at once: the weights under their names
/// (so the file loads as weights too), the optimiser's tensors and the training state. One file,
/// so that a kill can never pair weights with another moment's optimiser or step count.
pub fn save_resume_point(
    path: &Path,
    vs: &nn::VarStore,
    optimizer: Vec<(String, Tensor)>,
    state: &TrainState,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.to_device(Device::Cpu)))
        .collect();
    tensors.extend(optimizer);
    let json = serde_json::to_vec(state).context("serialising the training state")?;
    tensors.push((STATE_TENSOR.to_string(), Tensor::from_slice(&json)));
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(&tensors, tmp)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// What a resume point holds: every tensor by name, and the training state when the file has it
/// (files written before it did have theirs in `state.json` only).
pub struct ResumePoint {
    pub tensors: HashMap<String, Tensor>,
    pub state: Option<TrainState>,
}

pub fn read_resume_point(path: &Path) -> Result<ResumePoint> {
    let tensors = read_tensors(path)?;
    let state = match tensors.get(STATE_TENSOR) {
        Some(t) => {
            let bytes = Vec::<u8>::try_from(&t.flatten(0, -1))
                .with_context(|| format!("reading the training state in {}", path.display()))?;
            Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("parsing the training state in {}", path.display()))?,
            )
        }
        None => None,
    };
    Ok(ResumePoint { tensors, state })
}

/// The metrics log of a run (`metrics.jsonl`, one JSON record per line): its text is kept in
/// memory and the whole file replaced at every record, so a kill never leaves a torn line.
pub struct MetricsLog {
    path: PathBuf,
    text: String,
    /// False while the directory still holds a model this run replaces: records are kept in
    /// memory until `start_writing`.
    writing: bool,
}

impl MetricsLog {
    /// An empty log for a new run.
    pub fn new(dir: &Path, writing: bool) -> Self {
        Self {
            path: dir.join(METRICS),
            text: String::new(),
            writing,
        }
    }

    /// Writes the records kept so far, and every later one as it comes.
    pub fn start_writing(&mut self) -> Result<()> {
        self.writing = true;
        write_atomic(&self.path, self.text.as_bytes())
    }

    /// The log of a run resumed at `step`, less the records past it: the steps after the last
    /// save are trained again, and would otherwise appear twice. Returns how many were dropped.
    pub fn resume(dir: &Path, step: u64) -> Result<(Self, usize)> {
        let path = dir.join(METRICS);
        let old = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut text = String::with_capacity(old.len());
        let mut dropped = 0;
        for line in old.lines() {
            let at = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
            if at.is_some_and(|at| at <= step) {
                text.push_str(line);
                text.push('\n');
            } else {
                dropped += 1;
            }
        }
        let log = Self {
            path,
            text,
            writing: true,
        };
        Ok((log, dropped))
    }

    pub fn append(&mut self, record: &serde_json::Value) -> Result<()> {
        self.text.push_str(&record.to_string());
        self.text.push('\n');
        if !self.writing {
            return Ok(());
        }
        write_atomic(&self.path, self.text.as_bytes())
    }
}

/// Records `dir` as the latest model in the `LATEST` file beside it, in the checkpoint root it
/// was trained into (`checkpoints/LATEST` for the default `--out`).
pub fn record_latest(dir: &Path) -> Result<()> {
    let abs = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let root = abs.parent().unwrap_or(&abs);
    write_atomic(
        &root.join(LATEST),
        format!("{}\n", abs.display()).as_bytes(),
    )
}

/// The checkpoint to use: the one given, else the one recorded in `checkpoints/LATEST`.
pub fn resolve(dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = dir {
        return Ok(d.to_path_buf());
    }
    let latest = Path::new(CHECKPOINTS_DIR).join(LATEST);
    let text = std::fs::read_to_string(&latest).map_err(|_| {
        anyhow!(
            "no --checkpoint given and no latest model recorded in {} (train one with `textvae train CORPUS`)",
            latest.display()
        )
    })?;
    Ok(PathBuf::from(text.trim()))
}

/// A model ready to use: rebuilt from `config.json`, weights loaded, tokenizer checked.
pub struct Loaded {
    pub dir: PathBuf,
    pub config: CheckpointConfig,
    pub vs: nn::VarStore,
    pub vae: Vae,
    pub tokenizer: TextTokenizer,
    /// The training corpus's characters ([`CHARACTERS`]), when the checkpoint has them.
    pub characters: Option<String>,
}

impl Loaded {
    /// `strategy`, at most `max_len` tokens a sentence, guarded for this model's tokenizer and
    /// (where the checkpoint has them) its corpus's characters.
    pub fn decoding(&self, strategy: Strategy, max_len: usize) -> Decoding {
        Decoding::new(strategy, max_len).for_tokenizer(&self.tokenizer, self.characters.as_deref())
    }

    /// Codes z [N, Z] decoded `batch_size` at a time into sentences, one per row.
    pub fn decode(
        &self,
        z: &Tensor,
        decoding: &Decoding,
        batch_size: usize,
    ) -> Result<Vec<String>> {
        crate::sample::decode_texts(&self.vae, &self.tokenizer, z, decoding, batch_size)
    }
}

/// Checks that the files a checkpoint needs are there, naming the first one missing.
pub fn check_dir(dir: &Path) -> Result<()> {
    ensure!(dir.exists(), "checkpoint {} does not exist", dir.display());
    ensure!(
        dir.is_dir(),
        "checkpoint {} is not a directory",
        dir.display()
    );
    for f in [CONFIG, TOKENIZER, WEIGHTS] {
        ensure!(
            dir.join(f).is_file(),
            "checkpoint {} is incomplete: {} is missing",
            dir.display(),
            f
        );
    }
    Ok(())
}

pub fn load(dir: &Path, device: Device) -> Result<Loaded> {
    load_weights(dir, WEIGHTS, device)
}

/// Loads `weights` (`model.safetensors` or `last.safetensors`) from checkpoint `dir`.
pub fn load_weights(dir: &Path, weights: &str, device: Device) -> Result<Loaded> {
    check_dir(dir)?;
    let config: CheckpointConfig = read_json(&dir.join(CONFIG))
        .with_context(|| format!("checkpoint {} has an unreadable config", dir.display()))?;
    config
        .model
        .validate()
        .with_context(|| format!("checkpoint {} has an invalid model config", dir.display()))?;
    let tokenizer = TextTokenizer::load(&dir.join(TOKENIZER))?;
    check_tokenizer(&tokenizer, &config)
        .with_context(|| format!("checkpoint {}", dir.display()))?;
    let vs = nn::VarStore::new(device);
    let mut vae = Vae::new(vs.root(), &config.model);
    let path = dir.join(weights);
    let read = || -> Result<Prior> {
        let tensors = read_tensors(&path)?;
        load_variables(&vs, &tensors, &path)?;
        prior_in(&tensors, &path, config.model.latent_dim, device)
    };
    vae.prior = read().with_context(|| format!("loading weights {}", path.display()))?;
    let characters = read_characters(dir)?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        config,
        vs,
        vae,
        tokenizer,
        characters,
    })
}

/// The checkpoint's [`CHARACTERS`], or None where it has no such file.
fn read_characters(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(CHARACTERS);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A tokenizer matches a checkpoint when it is of the recorded kind and has the vocabulary size
/// the embedding and output layers were built for.
pub fn check_tokenizer(tok: &TextTokenizer, config: &CheckpointConfig) -> Result<()> {
    if tok.vocab_size() != config.model.vocab_size || tok.kind() != config.tokenizer {
        bail!(
            "tokenizer does not match the model: it is a {} tokenizer with {} tokens, the model was built for a {} tokenizer with {}",
            tok.kind(),
            tok.vocab_size(),
            config.tokenizer,
            config.model.vocab_size
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_json_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_json(
            &p,
            &TrainState {
                epoch: 1,
                ..Default::default()
            },
        )
        .unwrap();
        write_json(
            &p,
            &TrainState {
                epoch: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let s: TrainState = read_json(&p).unwrap();
        assert_eq!(s.epoch, 2);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
