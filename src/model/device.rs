//! Where a model runs and in what precision: the `device` and `dtype` settings, and the candle device
//! and dtype they resolve to on this machine.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A device setting: `auto` (the first GPU the binary was built for, else the CPU), `cpu`, `cuda`,
/// `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

const DEVICE_NAMES: &str = "`auto`, `cpu`, `cuda`, `cuda:N`, `metal`";

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            "metal" => Ok(DeviceChoice::Metal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                // Worded as serde words unknown names, so plan errors suggest the closest one.
                _ => Err(format!(
                    "unknown variant `{s}`, expected one of {DEVICE_NAMES}"
                )),
            },
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceChoice {
    /// The device this names on this machine. A GPU the binary was not built for, or that is not
    /// there, is an error (never a silent fall-back to the CPU).
    pub fn resolve(self) -> Result<Device> {
        let gpu_err = |what: &str, e: candle_core::Error| {
            Error::model(format!("device `{self}`: {what}: {e}"))
        };
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available() {
                    shared_cuda(0).map_err(|e| gpu_err("CUDA", e))
                } else if candle_core::utils::metal_is_available() {
                    Device::new_metal(0).map_err(|e| gpu_err("Metal", e))
                } else {
                    Ok(Device::Cpu)
                }
            }
            DeviceChoice::Metal => {
                Device::new_metal(0).map_err(|e| gpu_err("Metal (build with --features metal)", e))
            }
            DeviceChoice::Cuda(n) => {
                shared_cuda(n).map_err(|e| gpu_err("CUDA (build with --features cuda)", e))
            }
        }
    }
}

/// The process's CUDA devices, one per GPU: every `resolve` of `cuda:N` gives the same candle device,
/// made with its own stream (`new_cuda_with_stream`) instead of candle's default of one stream per
/// host thread. All threads (the trainer's optimizer, the replicas' workers, the generator's loader
/// and decoder) then queue their work on that one stream in the order they issue it, so no kernel
/// reads a tensor another thread's kernel is still writing, and the run has one cuBLAS handle, one
/// RNG and one kernel cache per GPU.
fn shared_cuda(n: usize) -> candle_core::Result<Device> {
    static DEVICES: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, d)) = devices.iter().find(|(i, _)| *i == n) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda_with_stream(n)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        prepare_cuda(c);
    }
    devices.push((n, d.clone()));
    Ok(d)
}

/// One stream needs no events to order its work: cudarc's event tracking (two CUDA events per
/// allocation) is turned off. Data that crosses devices goes through the host, whose copies wait
/// for the stream. The default memory pool keeps freed memory for reuse instead of returning it to
/// the driver at every synchronization (its release threshold is 0 by default).
#[cfg(feature = "cuda")]
fn prepare_cuda(d: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys, DriverError};
    // Safety: every tensor of this device is made and used on its one stream (`shared_cuda`).
    unsafe { d.disable_event_tracking() };
    let ctx = d.cuda_stream().context().clone();
    let keep = || -> std::result::Result<(), DriverError> {
        ctx.bind_to_thread()?;
        let mut threshold = u64::MAX;
        // Safety: the pool is the device's default one; the attribute takes a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device())?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
    };
    if let Err(e) = keep() {
        log::warn!(
            "cuda: the memory pool cannot keep freed memory ({e:?}); allocation may be slower"
        );
    }
}

impl DeviceChoice {
    /// Whether this names a CUDA GPU (`auto`: when this machine has one), without opening it.
    pub fn is_cuda(self) -> bool {
        match self {
            DeviceChoice::Cuda(_) => true,
            DeviceChoice::Auto => candle_core::utils::cuda_is_available(),
            DeviceChoice::Cpu | DeviceChoice::Metal => false,
        }
    }

    /// The device's memory in bytes, where it can be read: a CUDA GPU's total, the machine's RAM for
    /// the CPU (Linux). `None` for a device this machine lacks.
    pub fn total_memory(self) -> Option<u64> {
        if self == DeviceChoice::Cpu || (self == DeviceChoice::Auto && !self.is_cuda()) {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kb: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            return Some(kb * 1024);
        }
        #[cfg(feature = "cuda")]
        if let Ok(Device::Cuda(d)) = self.resolve() {
            return d
                .cuda_stream()
                .context()
                .mem_get_info()
                .ok()
                .map(|(_, t)| t as u64);
        }
        None
    }
}

/// Free memory on `device`, in bytes, where it can be read (CUDA); `None` on the CPU.
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => match d.cuda_stream().context().mem_get_info() {
            Ok((free, _total)) => Some(free as u64),
            Err(e) => {
                log::warn!("reading the GPU's free memory: {e}");
                None
            }
        },
        _ => None,
    }
}

/// A dtype setting: `auto` is bf16 on CUDA and f32 elsewhere. f16 is allowed but warned about: T5's
/// activations overflow in f16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    #[default]
    Auto,
    #[serde(alias = "float32")]
    F32,
    #[serde(alias = "bfloat16")]
    Bf16,
    #[serde(alias = "float16")]
    F16,
}
crate::named_setting!(DTypeChoice);

impl DTypeChoice {
    /// The dtype this will name on `device`, without opening it (for estimates).
    pub fn planned(self, device: DeviceChoice) -> DType {
        match self {
            DTypeChoice::Auto if device.is_cuda() => DType::BF16,
            DTypeChoice::Auto | DTypeChoice::F32 => DType::F32,
            DTypeChoice::Bf16 => DType::BF16,
            DTypeChoice::F16 => DType::F16,
        }
    }

    /// The dtype this names on `device`.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            DTypeChoice::Auto if device.is_cuda() => DType::BF16,
            DTypeChoice::Auto | DTypeChoice::F32 => DType::F32,
            DTypeChoice::Bf16 => DType::BF16,
            DTypeChoice::F16 => {
                log::warn!("dtype f16: T5 activations overflow in float16 (inf/NaN outputs are likely); prefer bf16 or f32");
                DType::F16
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip_and_unknown_ones_list_the_valid() {
        for (name, d) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda:1", DeviceChoice::Cuda(1)),
            ("metal", DeviceChoice::Metal),
        ] {
            assert_eq!(name.parse::<DeviceChoice>(), Ok(d));
            assert_eq!(d.to_string(), name);
        }
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        let e = "gpu".parse::<DeviceChoice>().unwrap_err();
        assert!(
            e.contains("unknown variant `gpu`") && e.contains("`cuda:N`"),
            "{e}"
        );
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        let d: DeviceChoice = serde_json::from_str("\"cuda:2\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"cuda:2\"");
    }

    #[test]
    fn dtypes_resolve_per_device() {
        assert_eq!(DTypeChoice::Auto.resolve(&Device::Cpu), DType::F32);
        // Planned without opening the device: auto is bf16 on a named GPU.
        assert_eq!(
            DTypeChoice::Auto.planned(DeviceChoice::Cuda(3)),
            DType::BF16
        );
        assert_eq!(DTypeChoice::Auto.planned(DeviceChoice::Cpu), DType::F32);
        assert!(
            DeviceChoice::Cpu.total_memory().is_some_and(|m| m > 0) || !cfg!(target_os = "linux")
        );
        assert_eq!("bfloat16".parse::<DTypeChoice>(), Ok(DTypeChoice::Bf16));
        assert_eq!(DTypeChoice::Bf16.resolve(&Device::Cpu), DType::BF16);
        assert_eq!(DTypeChoice::F16.to_string(), "f16");
        assert!("f8".parse::<DTypeChoice>().is_err());
    }
}
