//! Where and how tensors run: device selection (`auto|cpu|cuda|cuda:N`), thread count, and the
//! facts `textvae info` prints.

use anyhow::{bail, Context, Result};
use tch::{Cuda, Device};

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

/// The lines of `textvae info`.
pub fn info_lines() -> Vec<String> {
    vec![
        format!("textvae {}", crate::VERSION),
        format!("libtorch {}", crate::LIBTORCH_VERSION),
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
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

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
