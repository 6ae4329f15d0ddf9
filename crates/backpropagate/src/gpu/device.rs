//! Which device a run trains on. `auto` takes an NVIDIA GPU when this build has CUDA
//! and a driver answers, an Apple GPU in a Metal build, and otherwise the CPU — with a
//! notice that says why, because a silent fall-back to the CPU turns a one-hour run
//! into a two-day one.

use candle_core::Device;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "metal" | "mps" => Ok(DeviceSpec::Metal),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("device must be auto, cpu, cuda, cuda:N or metal, got `{other}`")
                }),
        }
    }
}

/// The device a run got, in words for the log, and what the user should know about it.
#[derive(Debug, Clone)]
pub struct Picked {
    pub device: Device,
    /// `cpu`, `cuda:0`, `metal`.
    pub label: String,
    /// Set when `auto` fell back to the CPU: why, and what to do about it.
    pub notice: Option<String>,
}

impl Picked {
    pub fn cpu(notice: Option<String>) -> Picked {
        Picked {
            device: Device::Cpu,
            label: "cpu".into(),
            notice,
        }
    }

    /// NVML index of the GPU, for memory queries and the monitor.
    pub fn cuda_index(&self) -> Option<u32> {
        self.label
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
    }
}

/// Opens the device `spec` names. An explicit `cuda`/`metal` that cannot be opened is
/// an error; `auto` falls back to the CPU with a notice.
pub fn pick(spec: &str) -> Result<Picked> {
    let spec: DeviceSpec = spec.parse().map_err(Error::InvalidOption)?;
    match spec {
        DeviceSpec::Cpu => Ok(Picked::cpu(None)),
        DeviceSpec::Cuda(i) => open_cuda(i).map_err(Error::InvalidOption),
        DeviceSpec::Metal => open_metal().map_err(Error::InvalidOption),
        DeviceSpec::Auto => {
            if candle_core::utils::cuda_is_available() {
                match open_cuda(0) {
                    Ok(p) => return Ok(p),
                    Err(why) => {
                        return Ok(Picked::cpu(Some(format!("{why}; training on the CPU"))))
                    }
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(p) = open_metal() {
                    return Ok(p);
                }
            }
            Ok(Picked::cpu(Some(cpu_notice(&super::probe()))))
        }
    }
}

/// Why `auto` chose the CPU in a build without CUDA.
fn cpu_notice(status: &super::GpuStatus) -> String {
    match status {
        super::GpuStatus::Found { gpus } => format!(
            "training on the CPU: this build has no CUDA support although {} is present; \
             install the CUDA build of Backpropagate (or build with `--features cuda`) to train on it",
            gpus.first().map_or("an NVIDIA GPU", |g| g.name.as_str())
        ),
        super::GpuStatus::Absent { reason } => format!(
            "training on the CPU: {}",
            reason.trim_end_matches("; training runs on the CPU")
        ),
    }
}

fn open_cuda(index: usize) -> std::result::Result<Picked, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err(format!(
            "device cuda:{index} asked for, but this build has no CUDA support; install the CUDA build \
             of Backpropagate (or build with `--features cuda`), or train with device = \"cpu\""
        ));
    }
    Device::new_cuda(index)
        .map(|device| Picked {
            device,
            label: format!("cuda:{index}"),
            notice: None,
        })
        .map_err(|e| {
            format!(
                "cannot open NVIDIA GPU cuda:{index} ({e}); check the driver with `nvidia-smi` and `backprop doctor`"
            )
        })
}

fn open_metal() -> std::result::Result<Picked, String> {
    if !candle_core::utils::metal_is_available() {
        return Err(
            "device metal asked for, but this build has no Metal support; use the macOS build, \
             or train with device = \"cpu\""
                .into(),
        );
    }
    Device::new_metal(0)
        .map(|device| Picked {
            device,
            label: "metal".into(),
            notice: None,
        })
        .map_err(|e| format!("cannot open the Apple GPU ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:1".parse(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("metal".parse(), Ok(DeviceSpec::Metal));
        let err = "tpu".parse::<DeviceSpec>().unwrap_err();
        assert!(err.contains("auto, cpu, cuda"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    /// Without a CUDA build (CI here) `auto` gives the CPU and says why; an explicit
    /// `cuda` is an error that names the fix.
    #[test]
    fn auto_falls_back_to_the_cpu_with_a_notice() {
        let p = pick("cpu").unwrap();
        assert!(p.device.is_cpu() && p.notice.is_none());
        if !candle_core::utils::cuda_is_available() {
            let p = pick("auto").unwrap();
            assert!(p.device.is_cpu());
            let notice = p.notice.unwrap();
            assert!(notice.starts_with("training on the CPU"), "{notice}");
            let err = pick("cuda").unwrap_err().to_string();
            assert!(
                err.contains("--features cuda") && err.contains("cpu"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_notice_names_a_gpu_this_build_cannot_use() {
        let found = super::super::GpuStatus::Found {
            gpus: vec![super::super::GpuInfo {
                index: 0,
                name: "NVIDIA GeForce RTX 4070".into(),
                total_mb: 12_282,
                driver: "560.94".into(),
            }],
        };
        let n = cpu_notice(&found);
        assert!(n.contains("RTX 4070") && n.contains("CUDA build"), "{n}");
        let absent = super::super::GpuStatus::Absent {
            reason: "the NVIDIA driver reports no GPU; training runs on the CPU".into(),
        };
        assert_eq!(
            cpu_notice(&absent),
            "training on the CPU: the NVIDIA driver reports no GPU"
        );
    }
}
