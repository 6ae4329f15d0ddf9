//! The matrix products of one LoRA training step on SmolLM2-135M (4 rows × 256 tokens,
//! r16), timed through the same `blas::matmul` the fused ops use, in GFLOP/s. The
//! peer is the machine itself: a square 1024³ product, the best case for the kernel.
//! Used to decide build options such as gemm's AVX-512 (`x86-v4`) kernels.
//!
//! `cargo bench -p backpropagate --bench gemm_shapes`

use std::time::Instant;

use backpropagate::model::blas::{matmul, Mat};

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

fn main() {
    println!(
        "{:<22} {:>6} {:>6} {:>6} {:>10} {:>9}",
        "product", "m", "k", "n", "median ms", "GFLOP/s"
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
        times.sort_by(f64::total_cmp);
        let median = times[REPEATS / 2];
        println!(
            "{what:<22} {m:>6} {k:>6} {n:>6} {:>10.3} {:>9.1}",
            median * 1e3,
            2.0 * (m * k * n) as f64 / median / 1e9
        );
    }
}
