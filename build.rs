//! Bakes the libtorch library directory into the binaries' rpath, so `textvae` runs with no
//! `LD_LIBRARY_PATH`, and passes that directory to the crate (`TEXTVAE_LIBTORCH_LIB`): the binary
//! is not linked against `libtorch_cuda`, which `runtime::load_cuda` loads at start-up where an
//! NVIDIA driver exists (linked, it cost every command on a CPU-only machine 0.15 s and 265 MiB).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB not set by torch-sys: no rpath baked in");
        println!("cargo:rustc-env=TEXTVAE_LIBTORCH_VERSION=unknown");
        println!("cargo:rustc-env=TEXTVAE_LIBTORCH_LIB=");
        return;
    };
    println!("cargo:rustc-env=TEXTVAE_LIBTORCH_LIB={lib}");
    println!(
        "cargo:rustc-env=TEXTVAE_LIBTORCH_VERSION={}",
        libtorch_version(Path::new(&lib))
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}

/// Reads the version from the PyTorch install (`torch/version.py` beside `torch/lib`) or a
/// standalone libtorch (`build-version` beside `lib`).
fn libtorch_version(lib: &Path) -> String {
    let Some(root) = lib.parent() else {
        return "unknown".into();
    };
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest
                    .trim_start_matches([' ', '=', ':'])
                    .trim_start_matches("str")
                    .trim();
                let v = v.trim_matches(|c| c == '\'' || c == '"' || c == ' ');
                if !v.is_empty() {
                    return v.to_string();
                }
            }
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
