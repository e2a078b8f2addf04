//! textvae: a sentence variational autoencoder (Bowman et al. 2016) on libtorch through tch.
//! A convolutional encoder gives q(z|x), an LSTM decoder p(x|z); KL annealing, word dropout and
//! free bits keep the posterior from collapsing.

pub mod checkpoint;
pub mod cli;
pub mod codes;
pub mod config;
pub mod data;
pub mod eval;
pub mod files;
pub mod latent;
pub mod loss;
pub mod model;
pub mod native;
pub mod optim;
pub mod plot;
pub mod prior;
pub mod progress;
pub mod runtime;
pub mod sample;
pub mod tokenizer;
pub mod train;
pub mod utf8;

use rand::SeedableRng;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The libtorch version found at build time (from the PyTorch install tch was built against).
pub const LIBTORCH_VERSION: &str = env!("TEXTVAE_LIBTORCH_VERSION");

/// The one RNG type used for data shuffling and splitting, so seeds mean the same everywhere.
pub fn seeded_rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// libtorch's generator is global: a test that seeds it and then draws holds this lock, so that
/// tests running in parallel threads do not draw from each other's stream.
#[cfg(test)]
pub(crate) fn seeded(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    guard
}
