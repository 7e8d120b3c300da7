//! flashattn's `flash_attn` against candle's matmul-softmax-matmul attention on candle's CPU
//! device, side by side in one run.
//!
//! `cargo run --release -p flashattn-candle --example bench -- [seqlen] [iters]`
//! (defaults: 2048 and 5; batch 1, 16 heads, head_dim 64, f32).

use candle_core::{DType, Device, Result, Tensor, D};
use std::time::Instant;

/// Median wall time of `iters` runs of `f` after one warm-up, in milliseconds.
fn time_ms(iters: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// candle's usual attention (as in its llama example): q, k, v `(b, h, s, d)`, an additive
/// causal mask built once outside the timed region.
fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let mut s = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        s = s.broadcast_add(mask)?;
    }
    candle_nn::ops::softmax_last_dim(&s)?.matmul(v)
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seqlen = args.first().copied().unwrap_or(2048);
    let iters = args.get(1).copied().unwrap_or(5).max(1);
    let (b, h, d) = (1, 16, 64);
    let dev = Device::Cpu;
    let scale = 1.0 / (d as f64).sqrt();
    // flashattn takes (b, s, h, d); candle's path the transposed (b, h, s, d) copies.
    let rand = || Tensor::rand(-1f32, 1f32, (b, seqlen, h, d), &dev);
    let (q, k, v) = (rand()?, rand()?, rand()?);
    let bhsd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let (qt, kt, vt) = (bhsd(&q)?, bhsd(&k)?, bhsd(&v)?);
    let mask: Vec<f32> = (0..seqlen * seqlen)
        .map(|x| {
            if x % seqlen > x / seqlen {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (seqlen, seqlen), &dev)?;
    println!(
        "b={b} h={h} s={seqlen} d={d} f32, {} threads, median of {iters}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for causal in [false, true] {
        let m = causal.then_some(&mask);
        let naive = time_ms(iters, || candle_attention(&qt, &kt, &vt, m, scale))?;
        let flash = time_ms(iters, || {
            flashattn_candle::flash_attn(&q, &k, &v, scale as f32, causal)
        })?;
        // Same result, so the comparison is of equal work.
        let a = flashattn_candle::flash_attn(&q, &k, &v, scale as f32, causal)?;
        let e = candle_attention(&qt, &kt, &vt, m, scale)?.transpose(1, 2)?;
        let diff = (a - e)?
            .abs()?
            .flatten_all()?
            .max(D::Minus1)?
            .to_dtype(DType::F32)?;
        println!(
            "causal={causal:<5}  candle matmul-softmax-matmul {naive:9.1} ms   flashattn {flash:9.1} ms   speedup {:5.2}x   max |diff| {:.1e}",
            naive / flash,
            diff.to_scalar::<f32>()?
        );
    }
    Ok(())
}
