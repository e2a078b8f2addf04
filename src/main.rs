//! The `textvae` binary: parses the command line and hands it to the library.

use clap::Parser;

/// Rust's allocations (the tokenizers crate's strings and vectors above all: a quarter of the
/// time of tokenising a large corpus went to glibc's malloc and free) go to mimalloc; libtorch's
/// tensors stay with glibc, tuned by `runtime::tune_allocator`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Before anything asks libtorch about CUDA.
    if let Some(warning) = textvae::runtime::load_cuda() {
        eprintln!("warning: {warning}");
    }
    let cli = textvae::cli::Cli::parse();
    textvae::runtime::install_panic_hook();
    textvae::runtime::tune_allocator();
    if let Err(err) = textvae::cli::run(cli) {
        if textvae::cli::is_broken_pipe(&err) {
            return;
        }
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
