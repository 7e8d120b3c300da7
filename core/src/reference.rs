//! The f64 reference: the plain definition of attention, the oracle for every test.

use crate::{validate_inputs, AttentionSpec, Result, TensorRef};

/// Output and LSE in f64, in the spec's layouts.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Computes attention in f64 straight from the definition (scores materialised per row).
pub fn reference_attention(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<ReferenceOutput> {
    validate_inputs(spec, &q, &k, &v)?;
    let (hq, hkv, d, dv) = (spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v);
    let scale = spec.scale_value() as f64;
    let softcap = spec.softcap as f64;
    let mut out = vec![0.0f64; spec.out_elems().unwrap_or(0)];
    let mut lse = vec![f64::NEG_INFINITY; spec.lse_elems().unwrap_or(0)];
    // Widen once: the row loops below then run over plain f64 slices.
    let (q, k, v) = (widen(&q), widen(&k), widen(&v));
    let mut scores = Vec::new();
    for b in 0..spec.batch {
        let s = spec.seq(b);
        for h in 0..hq {
            let kh = spec.kv_head(h);
            let (dq, dk, dvs) = descales(spec, b, kh);
            let slope = spec.alibi_slope(b, h) as f64;
            for i in 0..s.q_len {
                let qrow = ((s.q_start + i) * hq + h) * d;
                let (lo, hi) = spec.key_range(i, s.q_len, s.k_len);
                if lo >= hi {
                    continue; // fully masked: out stays 0, lse -inf
                }
                scores.clear();
                for j in lo..hi {
                    let krow = ((s.k_start + j) * hkv + kh) * d;
                    let dot: f64 = q[qrow..qrow + d]
                        .iter()
                        .zip(&k[krow..krow + d])
                        .map(|(a, b)| a * b)
                        .sum();
                    let mut score = scale * dot * dq * dk;
                    if softcap > 0.0 {
                        score = softcap * (score / softcap).tanh();
                    }
                    let dist = (i as i64 + s.k_len as i64 - s.q_len as i64 - j as i64).abs();
                    score -= slope * dist as f64;
                    scores.push(score);
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                lse[spec.lse_index(b, h, i)] = max + sum.ln();
                let orow = ((s.q_start + i) * hq + h) * dv;
                for (jj, j) in (lo..hi).enumerate() {
                    let p = (scores[jj] - max).exp() / sum;
                    let vrow = ((s.k_start + j) * hkv + kh) * dv;
                    for (o, x) in out[orow..orow + dv].iter_mut().zip(&v[vrow..vrow + dv]) {
                        *o += p * x * dvs;
                    }
                }
            }
        }
    }
    Ok(ReferenceOutput { out, lse })
}

fn descales(spec: &AttentionSpec, b: usize, kh: usize) -> (f64, f64, f64) {
    match &spec.fp8_descale {
        Some(d) => {
            let i = b * spec.heads_kv + kh;
            (d.q[i] as f64, d.k[i] as f64, d.v[i] as f64)
        }
        None => (1.0, 1.0, 1.0),
    }
}

fn widen(t: &TensorRef<'_>) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}
