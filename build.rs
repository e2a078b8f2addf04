//! Bakes the libtorch library directory into the binaries' rpath, so `textvae` runs with no
//! `LD_LIBRARY_PATH`, and passes that directory to the crate (`TEXTVAE_LIBTORCH_LIB`): the binary
//! is not linked against `libtorch_cuda`, which `runtime::load_cuda` loads at start-up where an
//! NVIDIA driver exists (linked, it cost every command on a CPU-only machine 0.15 s and 265 MiB).
//! Also compiles the C++ side against the headers beside that directory: `src/fused_adam.cpp`
//! (libtorch's fused Adam, which tch does not wrap), `src/token_nll.cpp` (the output layer's
//! token NLL in one pass), `src/dropout.cpp` (dropout's noise drawn in parallel) and
//! `src/lstm.cpp` (the decoder's LSTM for scoring, its input shared by the K samples).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!(
            "DEP_TCH_LIBTORCH_LIB not set by torch-sys: libtorch's headers are needed for \
             the C++ side (build through scripts/ or set LIBTORCH_USE_PYTORCH=1 with the \
             torch venv active)"
        );
    };
    compile_cpp(Path::new(&lib));
    println!("cargo:rustc-env=TEXTVAE_LIBTORCH_LIB={lib}");
    println!(
        "cargo:rustc-env=TEXTVAE_LIBTORCH_VERSION={}",
        libtorch_version(Path::new(&lib))
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}

/// Builds the C++ side (`src/fused_adam.cpp`, `src/token_nll.cpp`, `src/dropout.cpp`,
/// `src/lstm.cpp`) as a static library linked into the crate, and on x86-64 the row loops (the
/// token NLL's and the LSTM cell's) once per instruction set libtorch dispatches its own
/// kernels to (the flags ATen builds its AVX2 and AVX512 kernels with). The headers sit beside
/// the library directory in both layouts (a PyTorch install's `torch/include`, a standalone
/// libtorch's `include`); the C++ ABI follows torch-sys's `LIBTORCH_CXX11_ABI` (default 1, what
/// PyTorch's wheels use since 2.7).
fn compile_cpp(lib: &Path) {
    for f in [
        "src/fused_adam.cpp",
        "src/token_nll.cpp",
        "src/token_nll_kernel.cpp",
        "src/dropout.cpp",
        "src/lstm.cpp",
        "src/lstm_kernel.cpp",
        "src/ffi_message.h",
        "src/kernel_dispatch.h",
        "src/kernel_vec.h",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = lib
        .parent()
        .map(|root| root.join("include"))
        .unwrap_or_default();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let build = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .include(&include)
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
        b
    };
    let x86 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    // The dispatcher first: a static library is searched for the symbols of those before it.
    let mut b = build();
    if x86 {
        b.define("TEXTVAE_X86_KERNELS", None);
    }
    let openmp = libtorch_uses_openmp(lib, &include) && b.get_compiler().is_like_gnu();
    if openmp {
        // `at::parallel_for` is a header template: without OpenMP it runs the whole range on
        // the calling thread, and the token NLL's rows took one core of two.
        b.flag("-fopenmp");
    }
    b.file("src/fused_adam.cpp")
        .file("src/token_nll.cpp")
        .file("src/dropout.cpp")
        .file("src/lstm.cpp")
        .compile("textvae_cpp");
    if openmp {
        // libtorch's own OpenMP runtime (a wheel ships it beside libtorch_cpu), so that the
        // kernel shares libtorch's thread pool rather than starting a second one.
        println!("cargo:rustc-link-arg=-l:libgomp.so.1");
    }
    if x86 {
        for (capability, flags) in [
            ("AVX2", &["-mavx2", "-mfma", "-mf16c"][..]),
            (
                "AVX512",
                &[
                    "-mavx512f",
                    "-mavx512bw",
                    "-mavx512vl",
                    "-mavx512dq",
                    "-mfma",
                ][..],
            ),
        ] {
            let mut b = build();
            b.define("CPU_CAPABILITY", capability)
                .define(&format!("CPU_CAPABILITY_{capability}"), None)
                .file("src/token_nll_kernel.cpp")
                .file("src/lstm_kernel.cpp");
            for f in flags {
                b.flag(*f);
            }
            b.compile(&format!("textvae_kernels_{}", capability.to_lowercase()));
        }
    }
}

/// Whether libtorch parallelises with OpenMP (ATen/Config.h says so) and ships the GNU runtime
/// beside its libraries, the one the C++ side must then share.
fn libtorch_uses_openmp(lib: &Path, include: &Path) -> bool {
    let config = std::fs::read_to_string(include.join("ATen/Config.h")).unwrap_or_default();
    config.contains("#define AT_PARALLEL_OPENMP 1") && lib.join("libgomp.so.1").exists()
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
