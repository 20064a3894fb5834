//! Device selection: `--device cpu|cuda[:N]` parsed once into a candle `Device` that every
//! training stage receives. CUDA needs the `cuda` cargo feature; without it (the default build)
//! asking for it is a clear error, never a silent fallback to the CPU.

use anyhow::{Result, bail};
use candle_core::Device;

/// The host CPU: where verification runs (our simulation must compute exactly what ONNX
/// Runtime's CPU kernels compute) and where CPU-only fallbacks copy tensors to.
pub const HOST: Device = Device::Cpu;

/// Where training runs, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(DeviceArg::Cpu);
        }
        match s.strip_prefix("cuda") {
            Some("") => Ok(DeviceArg::Cuda(0)),
            Some(rest) => match rest.strip_prefix(':').map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
                _ => bail!("device '{s}': expected cpu, cuda or cuda:N"),
            },
            None => bail!("device '{s}': expected cpu, cuda or cuda:N"),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(HOST),
            DeviceArg::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    // candle's driver errors carry a backtrace after their first line.
    Device::new_cuda(n).map_err(|e| {
        let e = e.to_string();
        anyhow::anyhow!(
            "--device cuda:{n}: {}",
            e.lines().next().unwrap_or_default()
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    bail!(
        "--device cuda:{n}: this datafree was built without CUDA; rebuild with `cargo build --release --features cuda` (see scripts/setup-cuda.sh)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda_ordinals() {
        assert_eq!("cpu".parse::<DeviceArg>().unwrap(), DeviceArg::Cpu);
        assert_eq!("cuda".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(0));
        assert_eq!("CUDA:1".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(1));
        assert!("gpu".parse::<DeviceArg>().is_err());
        assert!("cuda:x".parse::<DeviceArg>().is_err());
        assert_eq!(DeviceArg::Cuda(2).to_string(), "cuda:2");
        #[cfg(not(feature = "cuda"))]
        assert!(
            DeviceArg::Cuda(0)
                .open()
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }
}
