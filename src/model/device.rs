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
                Device::new_cuda(n)
                    .map_err(|e| DeviceError::Open(self, explain_cuda_error(&message(e))))
            }
            DeviceSpec::Metal(n) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(DeviceError::NotCompiled(self, "metal"));
                }
                Device::new_metal(n).map_err(|e| DeviceError::Open(self, message(e)))
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

/// candle's error without the backtrace it appends when RUST_BACKTRACE is
/// set: a device that cannot be opened is a user-facing error, not a bug.
fn message(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.to_string(),
        e => e.to_string(),
    }
}

/// Says in words what a CUDA driver error at device open means, before the
/// driver's own message (cudarc prints only the CUresult name when the driver
/// library is a stub).
fn explain_cuda_error(msg: &str) -> String {
    let hint = if msg.contains("CUDA_ERROR_STUB_LIBRARY") {
        "no NVIDIA GPU driver here: the libcuda.so.1 that was loaded is a link-time stub, not the driver's"
    } else if msg.contains("CUDA_ERROR_NO_DEVICE") {
        "no NVIDIA GPU is visible (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES hides them)"
    } else if msg.contains("CUDA_ERROR_INVALID_DEVICE") {
        "no GPU with that ordinal (nvidia-smi lists the GPUs, from 0)"
    } else if msg.contains("CUDA_ERROR_INSUFFICIENT_DRIVER")
        || msg.contains("CUDA_ERROR_COMPAT_NOT_SUPPORTED")
    {
        "the NVIDIA driver is older than the CUDA 13.0 this binary was built for (driver 580 or newer is needed)"
    } else if msg.contains("CUDA_ERROR_NOT_INITIALIZED") || msg.contains("CUDA_ERROR_UNKNOWN") {
        "the NVIDIA driver could not be initialised (no GPU, or a driver/kernel-module mismatch: see nvidia-smi)"
    } else {
        return msg.to_string();
    };
    format!("{hint} ({msg})")
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

    #[test]
    fn cuda_open_errors_are_said_in_words() {
        let stub = explain_cuda_error("DriverError(CUDA_ERROR_STUB_LIBRARY, \"<Failure>\")");
        assert!(stub.starts_with("no NVIDIA GPU driver here"), "{stub}");
        assert!(stub.contains("CUDA_ERROR_STUB_LIBRARY"), "{stub}");
        let none = explain_cuda_error(
            "DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device is detected\")",
        );
        assert!(none.starts_with("no NVIDIA GPU is visible"), "{none}");
        assert_eq!(explain_cuda_error("something else"), "something else");
    }
}
