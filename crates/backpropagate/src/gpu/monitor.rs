//! NVML: which NVIDIA GPU is there, and a background thread sampling VRAM, utilisation,
//! temperature and power once a second as `Event::Gpu`. Without a driver (or NVML
//! library) everything reports "no NVIDIA GPU" instead of failing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use serde::Serialize;

use crate::event::{Event, EventSink};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub total_mb: u64,
    pub driver: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum GpuStatus {
    Found {
        gpus: Vec<GpuInfo>,
    },
    /// No usable NVIDIA GPU; `reason` says why in words a user can act on.
    Absent {
        reason: String,
    },
}

impl GpuStatus {
    /// One line for logs, `doctor` and the app's status strip.
    pub fn summary(&self) -> String {
        match self {
            GpuStatus::Found { gpus } => gpus
                .iter()
                .map(|g| {
                    format!(
                        "cuda:{} {} ({} MB, driver {})",
                        g.index, g.name, g.total_mb, g.driver
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            GpuStatus::Absent { reason } => format!("no NVIDIA GPU found ({reason})"),
        }
    }
}

fn absent(e: impl std::fmt::Display) -> GpuStatus {
    let text = e.to_string();
    let lower = text.to_lowercase();
    let reason = if ["libloading", "library", "shared object", ".dll"]
        .iter()
        .any(|m| lower.contains(m))
    {
        "no NVIDIA driver (its NVML library is not installed); training runs on the CPU".to_string()
    } else {
        format!("NVML: {text}; training runs on the CPU")
    };
    GpuStatus::Absent { reason }
}

/// Looks for NVIDIA GPUs now. Cheap enough to call at startup.
pub fn probe() -> GpuStatus {
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => return absent(e),
    };
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => return absent(e),
    };
    let gpus: Vec<GpuInfo> = (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            Some(GpuInfo {
                index: i,
                name: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                total_mb: d.memory_info().map(|m| m.total >> 20).unwrap_or(0),
                driver: driver.clone(),
            })
        })
        .collect();
    if gpus.is_empty() {
        GpuStatus::Absent {
            reason: "the NVIDIA driver reports no GPU; training runs on the CPU".into(),
        }
    } else {
        GpuStatus::Found { gpus }
    }
}

/// Free VRAM on GPU `index` in bytes, or None without NVML or that GPU.
pub fn free_bytes(index: u32) -> Option<u64> {
    let nvml = Nvml::init().ok()?;
    let d = nvml.device_by_index(index).ok()?;
    d.memory_info().ok().map(|m| m.free)
}

/// Samples GPU `index` every `interval` on its own thread until dropped.
pub struct GpuMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GpuMonitor {
    /// Starts sampling, or says why it cannot (no driver, no such GPU).
    pub fn start(
        index: u32,
        interval: Duration,
        sink: Arc<dyn EventSink>,
    ) -> Result<GpuMonitor, String> {
        let nvml = Nvml::init().map_err(|e| absent(e).summary())?;
        nvml.device_by_index(index)
            .map_err(|e| format!("GPU {index}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("gpu-monitor".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    if let Ok(d) = nvml.device_by_index(index) {
                        let mem = d.memory_info().ok();
                        sink.emit(Event::Gpu {
                            used_mb: mem.as_ref().map(|m| m.used >> 20).unwrap_or(0),
                            total_mb: mem.as_ref().map(|m| m.total >> 20).unwrap_or(0),
                            util: d.utilization_rates().map(|u| u.gpu as f32).unwrap_or(0.0),
                            temp_c: d
                                .temperature(TemperatureSensor::Gpu)
                                .map(|t| t as f32)
                                .unwrap_or(0.0),
                            power_w: d.power_usage().map(|mw| mw as f32 / 1000.0).unwrap_or(0.0),
                        });
                    }
                    // Sleep in short slices so dropping the monitor is prompt.
                    let mut slept = Duration::ZERO;
                    while slept < interval && !flag.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                        slept += Duration::from_millis(50);
                    }
                }
            })
            .map_err(|e| format!("cannot start the GPU monitor thread: {e}"))?;
        Ok(GpuMonitor {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for GpuMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On machines without an NVIDIA driver (CI here) the probe and the monitor say so
    /// instead of panicking; with a driver, the probe lists the GPUs.
    #[test]
    fn without_a_driver_everything_says_no_gpu() {
        match probe() {
            GpuStatus::Absent { reason } => {
                assert!(reason.contains("CPU"), "{reason}");
                let sink: Arc<dyn EventSink> = Arc::new(crate::event::Silent);
                let err = GpuMonitor::start(0, Duration::from_millis(10), sink).err();
                assert!(err.is_some_and(|e| e.contains("no NVIDIA GPU")));
            }
            GpuStatus::Found { gpus } => {
                assert!(gpus.iter().all(|g| g.total_mb > 0), "{gpus:?}");
            }
        }
    }
}
