//! Which device holds the model, as a flag value (`cpu`, `cuda`, `cuda:1`,
//! `metal`, `auto`). Parsing is separate from opening so that a typo is a
//! flag error at start-up, and asking for CUDA from a CPU-only build names
//! the cargo feature that is missing instead of candle's generic message.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Host CPU, f32 (the default; what the tests run on).
    Cpu,
    /// NVIDIA GPU of that ordinal (needs the `cuda` cargo feature).
    Cuda(usize),
    /// Apple GPU of that ordinal (needs the `metal` cargo feature).
    Metal(usize),
    /// The first CUDA GPU when this build has CUDA support and one is
    /// present, else the CPU.
    Auto,
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected cpu, cuda, cuda:N, metal, metal:N or auto")]
    Unknown(String),
    #[error(
        "device {0}: this binary was built without the `{1}` feature (cargo build --release --features {1})"
    )]
    NotCompiled(DeviceSpec, &'static str),
    #[error("device {0}: {1}")]
    Open(DeviceSpec, String),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match lower.split_once(':') {
            Some((k, n)) => (
                k,
                Some(
                    n.parse::<usize>()
                        .map_err(|_| DeviceError::Unknown(s.to_string()))?,
                ),
            ),
            None => (lower.as_str(), None),
        };
        match (kind, ordinal) {
            ("cpu", None) => Ok(DeviceSpec::Cpu),
            ("auto", None) => Ok(DeviceSpec::Auto),
            ("cuda" | "gpu", n) => Ok(DeviceSpec::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(DeviceSpec::Metal(n.unwrap_or(0))),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

impl DeviceSpec {
    /// Opens the device.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NotCompiled(self, "cuda"));
                }
                Device::new_cuda(n).map_err(|e| DeviceError::Open(self, e.to_string()))
            }
            DeviceSpec::Metal(n) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(DeviceError::NotCompiled(self, "metal"));
                }
                Device::new_metal(n).map_err(|e| DeviceError::Open(self, e.to_string()))
            }
            DeviceSpec::Auto => {
                if candle_core::utils::cuda_is_available()
                    && let Ok(d) = Device::new_cuda(0)
                {
                    return Ok(d);
                }
                Ok(Device::Cpu)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_parse_and_typos_are_named() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["tpu", "cuda:x", "cpu:1", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("unknown device"), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_opens_and_auto_falls_back_to_cpu_without_a_gpu() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
