//! The GPU side that works without a GPU: finding an NVIDIA GPU through NVML (loaded at
//! run time, so the same binary runs on machines without a driver), a monitor thread
//! that reports `Gpu` events, and the memory estimate behind automatic batch sizes.

mod device;
pub mod memory;
mod monitor;
mod thermal;

pub use device::{pick, DeviceSpec, Picked};
pub use monitor::{probe, GpuInfo, GpuMonitor, GpuStatus};
pub use thermal::{ThermalChange, ThermalGuard};
