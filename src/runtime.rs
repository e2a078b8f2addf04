//! Where and how tensors run: device selection (`auto|cpu|cuda|cuda:N`), thread count, the
//! memory there is to run in, libtorch's errors as errors, and the facts `textvae info` prints.

use anyhow::{anyhow, bail, Context, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::{Cuda, Device, Kind};

use crate::config::Precision;

/// Parses `--device`. `auto` takes CUDA device 0 when libtorch sees one; asking for CUDA where
/// there is none is an error rather than a silent fall-back to the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("--device {s}: `{n}` is not a device number"))?,
                None => 0,
            };
            let count = Cuda::device_count();
            if !Cuda::is_available() || count == 0 {
                bail!("--device {s}: CUDA is not available on this machine (libtorch sees no GPU); use --device cpu or auto");
            }
            if index as i64 >= count {
                bail!(
                    "--device {s}: there are only {count} CUDA devices (0..{})",
                    count - 1
                );
            }
            Ok(Device::Cuda(index))
        }
        other => bail!("--device must be auto, cpu, cuda or cuda:N, got `{other}`"),
    }
}

/// Sets libtorch's intra-op thread count; `None` keeps one thread per available core.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    let n = match threads {
        Some(0) => bail!("--threads must be positive"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    tch::set_num_threads(n as i32);
    Ok(())
}

/// Whether this CPU multiplies bfloat16 natively (AVX512-BF16, which CPUs with AMX have too);
/// elsewhere libtorch emulates it, slower than float32.
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The number format `precision` stands for on `device`. `auto` takes bfloat16 only where it was
/// measured to pay: a CPU with native bf16. On a GPU it stays float32 until measured there.
pub fn matmul_kind(precision: Precision, device: Device) -> Kind {
    match precision {
        Precision::F32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Auto if device == Device::Cpu && cpu_has_bf16() => Kind::BFloat16,
        Precision::Auto => Kind::Float,
    }
}

/// The `--precision` name of number format `kind`, for logs and reports.
pub fn precision_name(kind: Kind) -> &'static str {
    if kind == Kind::BFloat16 {
        "bf16"
    } else {
        "f32"
    }
}

/// Seeds libtorch's generator and sets the thread count: the two things a reproducible run needs.
pub fn setup(seed: Option<u64>, threads: Option<usize>) -> Result<()> {
    set_threads(threads)?;
    if let Some(s) = seed {
        tch::manual_seed(s as i64);
    }
    Ok(())
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Marks the panics tch raises for a libtorch error (its infallible calls unwrap `Torch(..)`).
const TORCH_PANIC: &str = "Torch(\"";

/// Runs `f`, turning a libtorch error that tch raised as a panic (out of memory, a shape it
/// rejects) into an error carrying libtorch's own first line. tch's infallible calls have
/// caught the C++ exception already, so unwinding through them is sound; other panics (bugs)
/// keep unwinding.
pub fn catch_torch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => match torch_message(panic_text(payload.as_ref())) {
            Some(m) => Err(anyhow!("libtorch: {m}")),
            None => std::panic::resume_unwind(payload),
        },
    }
}

/// The message a panic carries (`panic!` gives a String or a &str), empty for anything else.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default()
}

/// Whether `err` (or a cause) is libtorch running out of memory, so callers can say what to lower.
pub fn is_out_of_memory(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        let m = c.to_string();
        m.contains("can't allocate memory") || m.contains("out of memory")
    })
}

/// libtorch's message out of a tch panic: what follows `Torch("`, without the C++ stack
/// (`\nframe #0: ...`) and the enforce-site prefix.
fn torch_message(panic: &str) -> Option<String> {
    let start = panic.find(TORCH_PANIC)? + TORCH_PANIC.len();
    let rest = &panic[start..];
    // The payload is Debug-formatted: newlines arrive as the two characters `\n`.
    let end = ["\\n", "\n", "\")"]
        .iter()
        .filter_map(|stop| rest.find(stop))
        .min()
        .unwrap_or(rest.len());
    let line = rest[..end].trim();
    let line = match (line.starts_with("[enforce fail"), line.find("] ")) {
        (true, Some(i)) => line[i + 2..].trim_start_matches("err == 0. "),
        _ => line,
    };
    Some(line.trim().to_string())
}

/// Installs a panic hook that stays silent for libtorch errors, which `catch_torch` turns into
/// the error `main` prints; every other panic is reported as before.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !panic_text(info.payload()).contains(TORCH_PANIC) {
            default(info);
        }
    }));
}

/// Bytes of memory this process may still take on `device`, where that can be known: on the
/// CPU the smaller of the kernel's MemAvailable and what the cgroup (a container's limit)
/// leaves. None on a GPU (tch does not expose its free memory) or where /proc is missing.
pub fn available_memory(device: Device) -> Option<u64> {
    if device != Device::Cpu {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo_kib(&meminfo, "MemAvailable:")? * 1024;
    let read_u64 = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    let cgroup = read_u64("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read_u64("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    Some(cgroup.map_or(available, |c| c.min(available)))
}

/// The value in KiB of `key` in /proc/meminfo's text.
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Keeps the memory of freed tensors in the process for the next step instead of handing it back
/// to the kernel. glibc serves every allocation above a threshold (128 KiB, growing to at most
/// 32 MiB) with a fresh mmap and unmaps it on free, so each training step faulted in and zeroed
/// its activations anew: on PTB 3.1 M page faults and 6.6 s of system time in 25 s, and
/// ~15% of training throughput (README, Performance). With the thresholds raised, large blocks
/// come from the heap and are reused. The price is memory: the heap keeps every freed block,
/// and blocks of a size no longer asked for are kept too, so the process grows past its live
/// peak (`release_free_memory` between phases bounds it). Call once, before the first tensor.
/// Elsewhere than glibc it does nothing.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 1 << 30;
        const TRIM_THRESHOLD: libc::c_int = libc::c_int::MAX;
        // SAFETY: mallopt only sets glibc's tunables; it is called before any other thread
        // exists. A refused value (0) leaves glibc's default in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Hands the free pages of the heap back to the kernel (glibc's `malloc_trim`), between phases
/// that each reuse their own memory: with the thresholds `tune_allocator` raises nothing else
/// ever does, and blocks of sizes one phase no longer asks for kept the process at its
/// high-water mark of every phase so far (4.4 GB after an hour of PTB training). Costs a few
/// milliseconds, and the next phase faults its pages in once. Elsewhere than glibc it does
/// nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns memory malloc holds free; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The directory libtorch's libraries were built against (the rpath's); empty if unknown.
const LIBTORCH_LIB: &str = env!("TEXTVAE_LIBTORCH_LIB");

/// Loads libtorch's CUDA half where an NVIDIA driver exists. The binary is not linked against
/// `libtorch_cuda`: that library and the CUDA libraries it pulls in (cuSPARSE, cuFFT, ...) cost
/// every command 0.15 s of start-up and 265 MiB of memory on a machine without a GPU, where
/// they can do nothing. libtorch decides once, at the first question about CUDA, whether it
/// has it, so `main` calls this before anything else. Returns a warning when a driver exists
/// but the library that is there cannot be loaded (CUDA then stays off, as it must).
pub fn load_cuda() -> Option<String> {
    let (status, warning) = load_cuda_library();
    let _ = CUDA_LIBRARY.set(status);
    warning
}

/// What `load_cuda` found, for `textvae info`.
static CUDA_LIBRARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn load_cuda_library() -> (String, Option<String>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::{CStr, CString};
        // SAFETY: dlopen and dlerror are called with NUL-terminated strings that outlive the
        // calls, before any other thread exists; a library loaded stays loaded for the process.
        unsafe {
            let driver = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY);
            if driver.is_null() {
                return ("not loaded: no NVIDIA driver".into(), None);
            }
            let built = std::path::Path::new(LIBTORCH_LIB).join("libtorch_cuda.so");
            let ours = built.is_file();
            let name = if ours {
                built.to_string_lossy().into_owned()
            } else {
                "libtorch_cuda.so".to_string() // another libtorch: the rpath and LD_LIBRARY_PATH
            };
            let Ok(cname) = CString::new(name.clone()) else {
                return (format!("not loaded: bad path {name}"), None);
            };
            let cuda = libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
            if !cuda.is_null() {
                return (format!("loaded ({name})"), None);
            }
            if !ours {
                return ("not loaded: libtorch without CUDA".into(), None);
            }
            let err = libc::dlerror();
            let why = if err.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(err).to_string_lossy().into_owned()
            };
            let warning = format!(
                "an NVIDIA driver is present but {name} could not be loaded ({why}); \
                 running on the CPU"
            );
            (format!("not loaded: {why}"), Some(warning))
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    ("not loaded: only Linux loads it".into(), None)
}

/// The lines of `textvae info`.
pub fn info_lines() -> Vec<String> {
    vec![
        format!("textvae {}", crate::VERSION),
        format!("libtorch {}", crate::LIBTORCH_VERSION),
        format!(
            "libtorch_cuda: {}",
            CUDA_LIBRARY.get().map_or("not asked for", String::as_str)
        ),
        format!(
            "cuda available: {} ({} devices, cudnn {})",
            if Cuda::is_available() { "yes" } else { "no" },
            Cuda::device_count(),
            if Cuda::cudnn_is_available() {
                "yes"
            } else {
                "no"
            }
        ),
        format!(
            "--device auto picks: {}",
            device_name(Device::cuda_if_available())
        ),
        format!("threads: {}", tch::get_num_threads()),
        format!(
            "bf16 on the CPU: {}",
            if cpu_has_bf16() {
                "native (AVX512-BF16): train and eval --precision auto take bf16 on the CPU"
            } else {
                "not native: train and eval --precision auto stay f32"
            }
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libtorch_panic_becomes_its_first_line() {
        let r: Result<()> = catch_torch(|| {
            let t = tch::Tensor::zeros([2, 3], (tch::Kind::Float, Device::Cpu));
            let _ = t.matmul(&t); // [2, 3] x [2, 3]: libtorch refuses
            Ok(())
        });
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with("libtorch: "), "{e}");
        assert!(e.contains("cannot be multiplied"), "{e}");
        assert!(!e.contains("frame #"), "{e}");
        let oom = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 3796484096 bytes. Error code 12 (Cannot allocate memory)\\nframe #0: c10::ThrowEnforceNotMet\")";
        assert_eq!(
            torch_message(oom).unwrap(),
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 3796484096 bytes. Error code 12 (Cannot allocate memory)"
        );
        assert_eq!(torch_message("index out of bounds"), None);
    }

    #[test]
    fn other_panics_keep_unwinding() {
        let r = std::panic::catch_unwind(|| catch_torch::<()>(|| panic!("a bug")));
        assert!(r.is_err());
    }

    #[test]
    fn meminfo_is_read_in_kib() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   12345 kB\n";
        assert_eq!(meminfo_kib(text, "MemAvailable:"), Some(12345));
        assert_eq!(meminfo_kib(text, "SwapFree:"), None);
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(available_memory(Device::Cpu).unwrap() > 0);
        }
    }

    #[test]
    fn precision_auto_takes_bf16_only_where_native() {
        assert_eq!(matmul_kind(Precision::F32, Device::Cpu), Kind::Float);
        assert_eq!(matmul_kind(Precision::Bf16, Device::Cpu), Kind::BFloat16);
        assert_eq!(matmul_kind(Precision::Auto, Device::Cuda(0)), Kind::Float);
        let auto = matmul_kind(Precision::Auto, Device::Cpu);
        assert_eq!(auto == Kind::BFloat16, cpu_has_bf16());
    }

    #[test]
    fn device_specs() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("auto").unwrap(), Device::cuda_if_available());
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        if !Cuda::is_available() {
            let e = parse_device("cuda").unwrap_err().to_string();
            assert!(e.contains("not available"), "{e}");
        }
    }
}
