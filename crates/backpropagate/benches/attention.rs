//! The fused causal attention op at SmolLM2-135M's shape (9 query heads, 3 k/v heads,
//! head dim 64), forward and backward, in GFLOP/s of the products it runs (causal
//! pairs only). The peer is the machine itself: a square 1024³ product through the
//! same `blas::matmul`, the best case for the kernel, so the last column says how much
//! of the machine's product speed attention reaches.
//!
//! `cargo bench -p backpropagate --bench attention`

use std::sync::Arc;
use std::time::Instant;

use backpropagate::model::attention_op::Attention;
use backpropagate::model::blas::{matmul, Mat};
use candle_core::{Device, Tensor, Var};

const REPEATS: usize = 5;
const HEADS: usize = 9;
const KV: usize = 3;
const D: usize = 64;

fn median_of(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Query-key pairs the op computes for a segment of `n` tokens: blocks of 64 rows
/// against their causal prefix.
fn pairs(n: usize) -> usize {
    (0..n)
        .step_by(64)
        .map(|i0| (i0 + 64).min(n) * ((i0 + 64).min(n) - i0))
        .sum()
}

fn square_gflops() -> f64 {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32 * 0.01).collect();
    let mut dst = vec![0f32; n * n];
    let times = (0..REPEATS)
        .map(|_| {
            let t = Instant::now();
            matmul(&mut dst, false, 1.0, Mat::rm(&a, n, n), Mat::rm(&a, n, n)).expect("gemm");
            t.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (n * n * n) as f64 / median_of(times) / 1e9
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let peak = square_gflops();
    println!("square 1024³ product: {peak:.1} GFLOP/s");
    println!(
        "{:<16} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "segments", "fwd ms", "bwd ms", "fwd GF/s", "bwd GF/s", "all GF/s", "×peak"
    );
    for (what, segments) in [
        ("4 × 256", vec![256; 4]),
        ("1 × 1024", vec![1024]),
        ("1 × 4096", vec![4096]),
    ] {
        let t: usize = segments.iter().sum();
        let mut spans = Vec::new();
        let mut start = 0;
        for &n in &segments {
            spans.push((start, n));
            start += n;
        }
        let spans = Arc::new(spans);
        let q = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (1, HEADS, t, D), &dev)? * 0.125)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, KV, t, D), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, t, KV, D), &dev)?)?;
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for _ in 0..REPEATS {
            let t0 = Instant::now();
            let out = q.apply_op3(&k, &v, Attention::new(spans.clone(), HEADS / KV))?;
            let t1 = Instant::now();
            let grads = out.sum_all()?.backward()?;
            let t2 = Instant::now();
            assert!(grads.get(&q).is_some());
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
        let (f, b) = (median_of(fwd), median_of(bwd));
        // Two products forward (q·kᵀ, p·v), five backward (recomputed scores, dP, dV,
        // dQ, dK), each 2·d flops per pair and query head.
        let per = 2.0
            * D as f64
            * HEADS as f64
            * segments.iter().map(|&n| pairs(n)).sum::<usize>() as f64;
        let (gf, gb, ga) = (
            2.0 * per / f / 1e9,
            5.0 * per / b / 1e9,
            7.0 * per / (f + b) / 1e9,
        );
        println!(
            "{what:<16} {:>8.2} {:>8.2} {gf:>9.1} {gb:>9.1} {ga:>9.1} {:>7.2}",
            f * 1e3,
            b * 1e3,
            ga / peak
        );
    }
    Ok(())
}
