//! Attention written with candle's own ops (matmul, softmax, matmul), independent of
//! flashattn: the oracle of these tests, differentiable through candle's autograd.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, D};

/// Mask and score options, in candle-flash-attn's conventions.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    pub window: (Option<usize>, Option<usize>),
    pub softcap: f32,
    /// `[heads_q]`, f32.
    pub alibi: Option<Vec<f32>>,
}

/// Row i of a `(sq, sk)` problem sees key j (bottom-right aligned window).
fn visible(i: usize, j: usize, sq: usize, sk: usize, w: (Option<usize>, Option<usize>)) -> bool {
    let (i, j, shift) = (i as i64, j as i64, sk as i64 - sq as i64);
    let left_ok = w.0.is_none_or(|l| j >= i + shift - l as i64);
    let right_ok = w.1.is_none_or(|r| j <= i + shift + r as i64);
    left_ok && right_ok
}

/// Dense attention in f32 from candle ops. q `(b, sq, hq, d)`, k, v `(b, sk, hkv, d|dv)`;
/// returns out `(b, sq, hq, dv)` (f32) and LSE `(b, hq, sq)` (`-inf` where a row sees nothing).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    o: &Opts,
) -> Result<(Tensor, Tensor)> {
    let dev = q.device();
    let (b, sq, hq, _) = q.dims4()?;
    let (_, sk, hkv, d) = k.dims4()?;
    let dv = v.dim(3)?;
    let g = hq / hkv;
    let q = q.to_dtype(DType::F32)?.transpose(1, 2)?;
    // GQA: query head h reads kv head h / g.
    let expand = |t: &Tensor, dim: usize| -> Result<Tensor> {
        t.to_dtype(DType::F32)?
            .transpose(1, 2)?
            .unsqueeze(2)?
            .broadcast_as((b, hkv, g, sk, dim))?
            .reshape((b, hq, sk, dim))
    };
    let (k, v) = (expand(k, d)?, expand(v, dv)?);
    let mut s = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale as f64)?;
    if o.softcap > 0.0 {
        s = ((s / o.softcap as f64)?.tanh()? * o.softcap as f64)?;
    }
    if let Some(slopes) = &o.alibi {
        let mut bias = Vec::with_capacity(hq * sq * sk);
        for slope in slopes {
            for i in 0..sq {
                for j in 0..sk {
                    let dist = (i as i64 + sk as i64 - sq as i64 - j as i64).abs();
                    bias.push(-slope * dist as f32);
                }
            }
        }
        s = s.broadcast_add(&Tensor::from_vec(bias, (1, hq, sq, sk), dev)?)?;
    }
    let seen: Vec<f32> = (0..sq * sk)
        .map(|x| visible(x / sk, x % sk, sq, sk, o.window) as u8 as f32)
        .collect();
    let seen = Tensor::from_vec(seen, (1, 1, sq, sk), dev)?;
    // Masked scores get -1e30 (finite, so fully masked rows stay NaN-free), then p is zeroed.
    let penalty = ((seen.clone() - 1.0)? * 1e30)?;
    let s = s.broadcast_add(&penalty)?;
    let p = candle_nn::ops::softmax(&s, D::Minus1)?.broadcast_mul(&seen)?;
    let out = p.matmul(&v.contiguous()?)?.transpose(1, 2)?;
    let m = s.max_keepdim(D::Minus1)?;
    let sum = s
        .broadcast_sub(&m)?
        .exp()?
        .broadcast_mul(&seen)?
        .sum_keepdim(D::Minus1)?;
    let lse = (sum.log()? + m)?.squeeze(D::Minus1)?;
    Ok((out, lse))
}

/// Varlen attention from [`attention`] per sequence: q `(total_q, hq, d)` and so on; LSE
/// `(hq, total_q)`.
pub fn attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &[u32],
    cu_k: &[u32],
    scale: f32,
    o: &Opts,
) -> Result<(Tensor, Tensor)> {
    let (mut outs, mut lses) = (vec![], vec![]);
    for b in 0..cu_q.len() - 1 {
        let (q0, q1) = (cu_q[b] as usize, cu_q[b + 1] as usize);
        let (k0, k1) = (cu_k[b] as usize, cu_k[b + 1] as usize);
        let seq = |t: &Tensor, a: usize, z: usize| t.narrow(0, a, z - a)?.unsqueeze(0);
        let (out, lse) = attention(
            &seq(q, q0, q1)?,
            &seq(k, k0, k1)?,
            &seq(v, k0, k1)?,
            scale,
            o,
        )?;
        outs.push(out.squeeze(0)?);
        lses.push(lse.squeeze(0)?);
    }
    Ok((Tensor::cat(&outs, 0)?, Tensor::cat(&lses, 1)?))
}

/// Uniform random values in [-1, 1) of `dtype`.
pub fn rand(shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::rand(-1f32, 1f32, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Relative L2 error of `actual` against `expected` (both any float dtype), through
/// flashattn-core's metric (infinite on NaN).
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    let a = actual
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let e = expected
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(flashattn_core::rel_l2_error(&a, &e))
}

/// Largest LSE difference (`-inf` must match exactly).
pub fn lse_err(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    let a = actual.flatten_all()?.to_vec1::<f32>()?;
    let e = expected
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(flashattn_core::lse_max_error(&a, &e))
}

/// flashattn's tolerance for a candle dtype.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => flashattn_core::DType::F32.tolerance(),
        DType::F16 => flashattn_core::DType::F16.tolerance(),
        _ => flashattn_core::DType::Bf16.tolerance(),
    }
}
