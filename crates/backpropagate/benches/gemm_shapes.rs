//! The matrix products of one LoRA training step on SmolLM2-135M (4 rows × 256 tokens,
//! r16), timed through the same `blas::matmul` the fused ops use, in GFLOP/s. The
//! peer is the machine itself: a square 1024³ product, the best case for the kernel.
//! Used to decide build options such as gemm's AVX-512 (`x86-v4`) kernels. On CPUs
//! with AVX512-BF16 the same products also run through `blas_bf16` (`--precision
//! bf16`): with the rounding and packing of both operands, and the kernel alone.
//!
//! `cargo bench -p backpropagate --bench gemm_shapes`

use std::time::Instant;

use backpropagate::model::blas::{matmul, Mat};
use backpropagate::model::blas_bf16::{self, Bf16Rows, PackedB, View};

const REPEATS: usize = 7;

/// (what, m, k, n, rhs transposed)
const SHAPES: [(&str, usize, usize, usize, bool); 9] = [
    ("square 1024³", 1024, 1024, 1024, false),
    ("q/o forward  x·Wᵀ", 1024, 576, 576, true),
    ("k/v forward  x·Wᵀ", 1024, 576, 192, true),
    ("gate/up fwd  x·Wᵀ", 1024, 576, 1536, true),
    ("down forward x·Wᵀ", 1024, 1536, 576, true),
    ("gate/up bwd  g·W", 1024, 1536, 576, false),
    ("LoRA A       x·Aᵀ", 1024, 576, 16, true),
    ("LoRA B       u·Bᵀ", 1024, 16, 1536, true),
    ("LM head      h·Eᵀ", 85, 576, 49152, true),
];

fn median_of(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let bf16 = blas_bf16::supported();
    println!(
        "{:<22} {:>6} {:>6} {:>6} {:>10} {:>9}{}",
        "product",
        "m",
        "k",
        "n",
        "median ms",
        "GFLOP/s",
        if bf16 {
            "  bf16 ms  GFLOP/s  kernel GFLOP/s  ×f32"
        } else {
            ""
        }
    );
    for (what, m, k, n, transposed) in SHAPES {
        let lhs: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut dst = vec![0f32; m * n];
        let mut times = Vec::new();
        for _ in 0..REPEATS {
            let r = if transposed {
                Mat::t(&rhs, n, k)
            } else {
                Mat::rm(&rhs, k, n)
            };
            let t = Instant::now();
            matmul(&mut dst, false, 1.0, Mat::rm(&lhs, m, k), r).expect("gemm");
            times.push(t.elapsed().as_secs_f64());
        }
        let median = median_of(times);
        let gflops = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
        print!(
            "{what:<22} {m:>6} {k:>6} {n:>6} {:>10.3} {:>9.1}",
            median * 1e3,
            gflops(median)
        );
        if bf16 {
            // The frozen weights the products read are bf16, as a bf16 run holds them.
            let rhs: Vec<half::bf16> = rhs.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let (mut whole, mut kernel) = (Vec::new(), Vec::new());
            for _ in 0..REPEATS {
                let t = Instant::now();
                let a = Bf16Rows::new(View::rm(&lhs, m, k)).expect("pack lhs");
                let ta = t.elapsed().as_secs_f64();
                let b = if transposed {
                    PackedB::new(View::t(&rhs, n, k))
                } else {
                    PackedB::new(View::rm(&rhs, k, n))
                }
                .expect("pack rhs");
                let packed = Instant::now();
                if std::env::var_os("PACK").is_some() {
                    eprintln!(
                        "{what} pack a {:.3} ms, b {:.3} ms",
                        ta * 1e3,
                        (t.elapsed().as_secs_f64() - ta) * 1e3
                    );
                }
                blas_bf16::matmul(&mut dst, n, false, 1.0, &a, &b).expect("bf16 gemm");
                whole.push(t.elapsed().as_secs_f64());
                kernel.push(packed.elapsed().as_secs_f64());
            }
            let (whole, kernel) = (median_of(whole), median_of(kernel));
            print!(
                " {:>8.3} {:>8.1} {:>15.1} {:>5.2}",
                whole * 1e3,
                gflops(whole),
                gflops(kernel),
                median / whole
            );
        }
        println!();
    }
}
