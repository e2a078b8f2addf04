//! Helpers shared by the integration tests: the tiny corpus, a tiny model config, and running
//! the real binary in a temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn tiny_corpus() -> PathBuf {
    repo_path("corpora/tiny.txt")
}

/// Flags for a model small enough to train in seconds.
pub const TINY_MODEL: &[&str] = &[
    "--emb-dim",
    "32",
    "--hidden-dim",
    "64",
    "--latent-dim",
    "8",
    "--conv-filters",
    "16",
    "--vocab-size",
    "300",
    "--batch-size",
    "4",
    "--threads",
    "1",
    "--device",
    "cpu",
];

pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "command failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Failed cleanly: non-zero exit, the message contains `needle`, no panic or backtrace.
    pub fn fails_with(&self, needle: &str) {
        assert!(
            !self.status.success(),
            "expected failure, got success:\n{}",
            self.stdout
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "panic:\n{}", self.stderr);
        assert!(
            !self.stderr.contains("RUST_BACKTRACE"),
            "backtrace hint:\n{}",
            self.stderr
        );
    }
}

pub fn textvae(dir: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_textvae"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running textvae");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `textvae train <tiny corpus> <TINY_MODEL> <extra>` in `dir`.
pub fn train_tiny(dir: &Path, extra: &[&str]) -> Run {
    let corpus = tiny_corpus();
    let mut args = vec!["train", corpus.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(extra);
    textvae(dir, &args)
}

/// `textvae train <tiny corpus> <TINY_MODEL> <extra>` started in `dir` and left running, its
/// output piped.
pub fn spawn_train_tiny(dir: &Path, extra: &[&str]) -> std::process::Child {
    let corpus = tiny_corpus();
    let mut args = vec!["train", corpus.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_textvae"))
        .args(&args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting textvae train")
}

/// Like `textvae`, with `input` on standard input.
pub fn textvae_stdin(dir: &Path, args: &[&str], input: &str) -> Run {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_textvae"))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running textvae");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// libtorch's generator is process-wide: tests of one binary that seed it and draw hold this
/// lock, so a test running in a parallel thread cannot shift their random streams.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
