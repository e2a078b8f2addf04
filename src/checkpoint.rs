//! Checkpoints: a self-contained directory per model.
//!
//! ```text
//! config.json        model + training config, tokenizer kind, textvae and libtorch versions
//! model.safetensors  weights kept by the selection criterion (`--select`)
//! last.safetensors   weights at the end of the last epoch (what --resume continues from)
//! tokenizer.json     the tokenizer trained with the model
//! state.json         epoch, step, best value of that criterion, learning rate
//! metrics.jsonl      one JSON record per logging window and per epoch
//! heldout.txt        the held-out validation sentences, when no --valid file was given
//! ```
//!
//! Every file is written to a temporary name and renamed into place, so a kill at any moment
//! leaves the previous version loadable. The most recent training run is recorded in
//! `checkpoints/LATEST`, which commands use when no `--checkpoint` is given.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device};

use crate::config::{ModelConfig, TrainConfig};
use crate::model::Vae;
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
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const LATEST: &str = "LATEST";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointConfig {
    pub textvae_version: String,
    pub libtorch_version: String,
    pub tokenizer: String,
    pub corpus: String,
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
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// `model.safetensors` -> `model.tmp.safetensors`: the extension must stay, tch picks the format
/// by it.
fn tmp_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("file");
    let name = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}.tmp.{ext}"),
        None => format!("{stem}.tmp"),
    };
    path.with_file_name(name)
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
    let tmp = tmp_path(path);
    vs.save(&tmp)
        .with_context(|| format!("writing weights {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Appends one JSON record to `metrics.jsonl`.
pub fn append_metrics(dir: &Path, record: &serde_json::Value) -> Result<()> {
    let path = dir.join(METRICS);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{record}").with_context(|| format!("appending to {}", path.display()))
}

/// Records `dir` as the latest model in `checkpoints/LATEST` (relative to the working directory).
pub fn record_latest(dir: &Path) -> Result<()> {
    let root = Path::new(CHECKPOINTS_DIR);
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let abs = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
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
    let mut vs = nn::VarStore::new(device);
    let vae = Vae::new(vs.root(), &config.model);
    let path = dir.join(weights);
    vs.load(&path)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| {
            format!(
                "loading weights {} (corrupt or from another model?)",
                path.display()
            )
        })?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        config,
        vs,
        vae,
        tokenizer,
    })
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
    fn tmp_path_keeps_the_extension() {
        assert_eq!(
            tmp_path(Path::new("d/model.safetensors")),
            Path::new("d/model.tmp.safetensors")
        );
        assert_eq!(tmp_path(Path::new("d/LATEST")), Path::new("d/LATEST.tmp"));
    }

    #[test]
    fn write_atomic_replaces_whole_files() {
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
