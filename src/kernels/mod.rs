//! Fast CPU kernels as candle custom ops: convolution (forward, input and weight gradients,
//! depthwise as its own path), pooling, integer-factor upsampling and per-channel reductions.
//! These are the hot paths of every training method; candle 0.11's CPU versions are 10-50x
//! slower than PyTorch and several of their gradients are wrong (see ../shared/notes/candle.md).
//!
//! Every op computes gradients only for arguments that track (a frozen teacher pays for its input
//! gradient alone), is parallel over independent planes or samples with rayon, and sums in an
//! order that does not depend on the number of threads, so CPU results are bit-for-bit
//! reproducible. Other devices (CUDA) and the `builtin` switch use candle's own ops.

pub mod activation;
pub mod channel;
pub mod conv;
mod depthwise;
mod gemm;
pub mod pool;
pub mod upsample;

use candle_core::{CpuStorage, Device, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

pub use activation::{clamp, leaky_relu, relu};
pub use channel::{channel_affine, channel_moments, channel_sum};
pub use conv::{Conv2dSpec, conv2d};
pub use pool::{Pool2dSpec, pool2d};
pub use upsample::{UpMode, upsample2d};

static BUILTIN: AtomicBool = AtomicBool::new(false);

/// Routes every op to candle's built-in implementation (for benchmarks and cross-checks).
pub fn set_builtin(on: bool) {
    BUILTIN.store(on, Ordering::Relaxed);
}

/// Whether our kernels handle tensors on `device`.
pub fn enabled(device: &Device) -> bool {
    device.is_cpu() && !BUILTIN.load(Ordering::Relaxed)
}

/// The element types the kernels run on: f32 for training, f64 for gradient checks.
pub trait Elem:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn max0(self) -> Self;
    fn min0(self) -> Self;
    /// `a` where `self > 0`, else `b`, as a select the compiler can vectorise.
    fn select_pos(self, a: Self, b: Self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn of(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn max0(self) -> Self {
        if self > 0.0 { self } else { 0.0 }
    }
    fn min0(self) -> Self {
        if self < 0.0 { self } else { 0.0 }
    }
    fn select_pos(self, a: Self, b: Self) -> Self {
        if self > 0.0 { a } else { b }
    }
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn of(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Elem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn max0(self) -> Self {
        if self > 0.0 { self } else { 0.0 }
    }
    fn min0(self) -> Self {
        if self < 0.0 { self } else { 0.0 }
    }
    fn select_pos(self, a: Self, b: Self) -> Self {
        if self > 0.0 { a } else { b }
    }
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn of(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// The contiguous element slice a layout describes.
fn view<'a, T: Elem>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    let v = T::of(s).ok_or_else(|| {
        candle_core::Error::Msg(format!("{op}: operands must all be f32 or all f64"))
    })?;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: operand is not contiguous")))?;
    Ok(&v[a..b])
}

/// Runs `$body` with `$t` bound to the element type of the storage `$s`.
macro_rules! dispatch {
    ($s:expr, $op:expr, |$t:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => Err(candle_core::Error::Msg(format!(
                "{}: unsupported dtype {:?}",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ))),
        }
    };
}
pub(crate) use dispatch;

/// Sum of `v` (or dot product with `w`) with eight independent accumulators: a single float
/// accumulator does not vectorise (addition is not associative); the order is fixed.
pub(crate) fn sum8<T: Elem>(v: &[T], w: Option<&[T]>) -> T {
    let mut acc = [T::ZERO; 8];
    let mut tail = T::ZERO;
    match w {
        None => {
            let c = v.chunks_exact(8);
            for &x in c.remainder() {
                tail += x;
            }
            for x in c {
                for l in 0..8 {
                    acc[l] += x[l];
                }
            }
        }
        Some(w) => {
            let (c, d) = (v.chunks_exact(8), w.chunks_exact(8));
            for (&x, &y) in c.remainder().iter().zip(d.remainder()) {
                tail += x * y;
            }
            for (x, y) in c.zip(d) {
                for l in 0..8 {
                    acc[l] += x[l] * y[l];
                }
            }
        }
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail
}

fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

/// Process-wide settings for training speed; call once at start-up, before any threads exist.
///
/// The allocator keeps freed tensor buffers in the heap instead of returning them to the kernel:
/// glibc serves every allocation above 128 KiB-32 MiB (its dynamic mmap threshold) with a fresh
/// mmap, so each training step page-faults and zero-fills every activation and gradient buffer
/// anew; measured here, that was 45% of a ResNet-20 forward+backward (354 ms -> 193 ms).
///
/// candle's elementwise ops run on a worker pool of their own, as large as rayon's (which runs
/// our kernels): on a machine with as many threads as cores, every gradient accumulation of a
/// backward pass then waits for a parked worker competing with rayon's spinning ones (8% of a
/// GDFQ iteration in candle's barrier on 2 cores). Unless CANDLE_NUM_THREADS is set, candle's
/// pool is left empty and those ops run on the calling thread (docs/results.md, "Training
/// iteration benchmark").
pub fn tune_process() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called at start-up, before any other thread reads the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
