//! A bounds-checked wrapper over the `gemm` crate (candle's own matmul backend).

use super::Elem;

/// A strided matrix: element (r, c) is at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn t(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst[m x n]` (row-major) = `a[m x k] * b[k x n]`, or += when `accumulate`. Single-threaded:
/// callers parallelise over samples, which keeps results independent of the thread count.
pub fn matmul<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
) {
    product(m, n, k, dst, (n, 1), accumulate, a, b);
}

/// `matmul` with `dst` stored column-major (element (r, c) at `dst[c * m + r]`). The `gemm`
/// crate computes column-major destinations; a row-major one makes it transpose the product,
/// and where `b` is itself a transposed row-major matrix (the weight gradient's im2col columns)
/// it then packs `b` with a strided scalar gather: 3-10x slower on the weight-gradient shapes
/// of a CIFAR ResNet (examples/kernels_bench.rs).
pub fn matmul_col_major<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
) {
    product(m, n, k, dst, (1, m), accumulate, a, b);
}

/// `dst` (element (r, c) at `r * drs + c * dcs`, filling `m * n` entries) = `a * b`.
#[allow(clippy::too_many_arguments)]
fn product<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    (drs, dcs): (usize, usize),
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
) {
    assert!(
        dst.len() >= m * n && a.fits(m, k) && b.fits(k, n),
        "gemm operand out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::ZERO);
        }
        return;
    }
    // SAFETY: the extents of all three operands were checked above (dst's strides are (n, 1)
    // or (1, m), both spanning exactly m * n entries); dst does not alias a or b (it is a
    // unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dcs as isize,
            drs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
