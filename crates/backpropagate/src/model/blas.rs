//! Row-major f32 matrix products on the CPU with accumulation into the destination,
//! which candle's matmul does not offer: the fused ops add the LoRA term, the bias and
//! gradient contributions into one buffer instead of allocating and adding copies.

use candle_core::{bail, Result};

/// A read-only matrix: its data, and its row and column strides in elements.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major `rows × cols` matrix.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of `data` read as a row-major `rows × cols` matrix (so this one
    /// is `cols × rows`), without copying.
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols as isize,
        }
    }
}

impl<'a> Mat<'a> {
    /// A `rows × cols` matrix inside `data` whose rows are `rs` apart (columns
    /// adjacent): one head's slice of a (positions, heads, dim) tensor.
    pub fn rows_apart(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: rs as isize,
            cs: 1,
        }
    }

    /// The transpose of [`Mat::rows_apart`].
    pub fn t_rows_apart(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: rs as isize,
        }
    }

    /// One past the largest index the matrix reads.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.rs as usize + (self.cols - 1) * self.cs as usize + 1
    }
}

/// `dst = (accumulate ? dst : 0) + beta · lhs · rhs`, `dst` row-major `lhs.rows ×
/// rhs.cols`, multi-threaded. Shapes and buffer lengths are checked, so a wrong call
/// is an error, never an out-of-bounds read.
pub fn matmul(dst: &mut [f32], accumulate: bool, beta: f32, lhs: Mat, rhs: Mat) -> Result<()> {
    let n = rhs.cols;
    product(dst, n, accumulate, beta, lhs, rhs, true)
}

/// [`matmul`] into a destination whose rows are `dst_rs` apart: a band of columns of
/// a wider row-major matrix (`dst` starts at the band's first column).
pub fn matmul_into_columns(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    beta: f32,
    lhs: Mat,
    rhs: Mat,
) -> Result<()> {
    product(dst, dst_rs, accumulate, beta, lhs, rhs, true)
}

/// [`matmul`] on the calling thread only: for many small products already run in
/// parallel (one per attention head).
pub fn matmul_serial(
    dst: &mut [f32],
    accumulate: bool,
    beta: f32,
    lhs: Mat,
    rhs: Mat,
) -> Result<()> {
    let n = rhs.cols;
    product(dst, n, accumulate, beta, lhs, rhs, false)
}

fn product(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    beta: f32,
    lhs: Mat,
    rhs: Mat,
    threaded: bool,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        bail!("gemm: ({m}×{k}) · ({}×{n}) do not chain", rhs.rows);
    }
    for (what, mat) in [("lhs", &lhs), ("rhs", &rhs)] {
        if mat.extent() > mat.data.len() {
            bail!(
                "gemm: {what} {}×{} is larger than its {} values",
                mat.rows,
                mat.cols,
                mat.data.len()
            );
        }
    }
    let fits = if dst_rs == n {
        dst.len() == m * n
    } else {
        dst_rs > n && (m == 0 || dst.len() >= (m - 1) * dst_rs + n)
    };
    if !fits {
        bail!(
            "gemm: destination of {} values does not hold {m}×{n} with rows {dst_rs} apart",
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_rs..row * dst_rs + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threaded && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut run = || {
        // SAFETY: every index the kernel touches is (i·rs + j·cs) with i < rows and
        // j < cols, all below the matrix's extent, checked above to be within its
        // slice; dst's (i·dst_rs + j) likewise, and it is exclusively borrowed.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                dst_rs as isize,
                accumulate,
                lhs.data.as_ptr(),
                lhs.cs,
                lhs.rs,
                rhs.data.as_ptr(),
                rhs.cs,
                rhs.rs,
                1.0,
                beta,
                false,
                false,
                false,
                parallelism,
            );
        }
    };
    // Serial products run on several threads at once: their times would add up to
    // more than the wall time, so only the threaded ones are profiled.
    if threaded {
        super::profile::timed(super::profile::Part::Gemm, run);
    } else {
        run();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn products_of_matrices_and_transposes_match_the_definition() {
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let want = naive(&a, &b, m, k, n);
        let mut got = vec![1.0; m * n];
        matmul(&mut got, false, 1.0, Mat::rm(&a, m, k), Mat::rm(&b, k, n)).unwrap();
        assert_eq!(got, want);
        // bᵀ stored row-major (n × k), read back transposed; accumulate twice ×0.5.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut acc = vec![0.0; m * n];
        for _ in 0..2 {
            matmul(&mut acc, true, 0.5, Mat::rm(&a, m, k), Mat::t(&bt, n, k)).unwrap();
        }
        assert_eq!(acc, want);
        // Two bands of columns written into a wider matrix give the whole product.
        let split = 9;
        let mut wide = vec![0.0; m * n];
        matmul_into_columns(
            &mut wide[split..],
            n,
            false,
            1.0,
            Mat::rm(&a, m, k),
            Mat::t(&bt[split * k..], n - split, k),
        )
        .unwrap();
        matmul_into_columns(
            &mut wide,
            n,
            true,
            1.0,
            Mat::rm(&a, m, k),
            Mat::t(&bt[..split * k], split, k),
        )
        .unwrap();
        assert_eq!(wide, want);
        assert!(matmul(&mut acc, false, 1.0, Mat::rm(&a, m, k), Mat::rm(&b, n, k)).is_err());
        assert!(matmul(
            &mut acc[1..],
            false,
            1.0,
            Mat::rm(&a, m, k),
            Mat::rm(&b, k, n)
        )
        .is_err());
    }
}
