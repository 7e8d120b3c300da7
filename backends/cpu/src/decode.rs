//! Decode against a KV cache on host slices (FlashAttention's `flash_attn_with_kvcache`):
//! the new k / v rows are written into the caches in place (k rotated), q is rotated and
//! packed per KV head, then the split-KV kernel (`split_kv.rs`) attends.
//!
//! Everything that can fail (validation, buffers) happens before the first cache write,
//! so a refused call leaves the caches exactly as they were.

use crate::device::Isa;
use crate::io::{LseBuf, OutBuf, RowLayout, Src};
use crate::split_kv::{attend, Attend};
use crate::thread_pool::ThreadPool;
use flashattn_core::{
    CheckedSpec, DecodeInputs, Error, KvCache, Output, Result, Rotary, TensorMut, TensorRef,
};
use std::f32::consts::LOG2_E;

/// One decode step on validated inputs (`validate_decode_inputs` passed).
pub(crate) fn decode(
    pool: &ThreadPool,
    isa: Isa,
    c: &CheckedSpec<'_>,
    inputs: DecodeInputs<'_>,
) -> Result<Output> {
    let spec = c.spec;
    let cache = spec
        .kv_cache
        .as_ref()
        .ok_or_else(|| Error::invalid("kv_cache", "none", "a decode call needs a KV cache"))?;
    let DecodeInputs {
        q,
        mut k_cache,
        mut v_cache,
        k_new,
        v_new,
    } = inputs;
    let q = Src::new(q)?;
    let (out_t, out) = OutBuf::zeroed(spec.dtype.output(), c.sizes.out)?;
    let mut lse_v = if spec.return_lse {
        vec![f32::NEG_INFINITY; c.sizes.lse]
    } else {
        Vec::new()
    };
    let lse = spec.return_lse.then(|| LseBuf::new(&mut lse_v));
    if let (Some(kn), Some(vn)) = (k_new, v_new) {
        append(c, cache, &mut k_cache, &mut v_cache, kn, vn);
    }
    let (qp, d_pad) = pack_q(c, cache, q);
    let walk = (0..spec.batch)
        .map(|b| {
            let s = spec.seq(b);
            c.mask.keys_of_rows(0..s.q_len, s.q_len, s.k_len)
        })
        .collect::<Vec<_>>();
    let rows = spec.seqlen_q * spec.group_size();
    macro_rules! run {
        ($k:expr, $v:expr) => {{
            let p = Attend {
                spec,
                cache,
                mask: c.mask,
                k: $k,
                v: $v,
                q: &qp,
                d_pad,
                rows,
                walk,
            };
            attend(pool, isa, &p, &out, lse.as_ref())
        }};
    }
    match (k_cache.as_ref(), v_cache.as_ref()) {
        (TensorRef::F32(k), TensorRef::F32(v)) => run!(k, v),
        (TensorRef::F16(k), TensorRef::F16(v)) => run!(k, v),
        (TensorRef::Bf16(k), TensorRef::Bf16(v)) => run!(k, v),
        // Unreachable: q has the caches' dtype, and fp8 q was refused above, before any write.
        _ => return Err(crate::fp8_unsupported()),
    }
    Ok(Output {
        out: out_t,
        lse: spec.return_lse.then_some(lse_v),
    })
}

/// Writes the new rows of every batch entry at cache rows `seqlens[b]..`, k rotated at
/// positions `seqlens[b] + t`. Entries are written in batch order (two sequences sharing a
/// page see the later one's rows, as in the reference).
pub(crate) fn append(
    c: &CheckedSpec<'_>,
    cache: &KvCache,
    k_cache: &mut TensorMut<'_>,
    v_cache: &mut TensorMut<'_>,
    k_new: TensorRef<'_>,
    v_new: TensorRef<'_>,
) {
    let (hkv, d, dv, new) = (c.heads_kv, c.head_dim, c.head_dim_v, cache.seqlen_new);
    let mut row = vec![0.0f32; d];
    for b in 0..c.batch {
        let used = cache.seqlens[b] as usize;
        for t in 0..new {
            let dst = cache.row(b, used + t) * hkv;
            let src = (b * new + t) * hkv;
            match &cache.rotary {
                Some(rot) => {
                    for h in 0..hkv {
                        for (x, val) in row.iter_mut().enumerate() {
                            *val = k_new.get_f32((src + h) * d + x);
                        }
                        rotate(&mut row, used + t, rot);
                        k_cache.write_f32((dst + h) * d, &row);
                    }
                }
                None => copy(k_cache, dst * d, &k_new, src * d, hkv * d),
            }
            copy(v_cache, dst * dv, &v_new, src * dv, hkv * dv);
        }
    }
}

/// Copies `n` elements of the same dtype, bit for bit.
fn copy(dst: &mut TensorMut<'_>, at: usize, src: &TensorRef<'_>, from: usize, n: usize) {
    match (dst, src) {
        (TensorMut::F32(d), TensorRef::F32(s)) => d[at..at + n].copy_from_slice(&s[from..from + n]),
        (TensorMut::F16(d), TensorRef::F16(s)) => d[at..at + n].copy_from_slice(&s[from..from + n]),
        (TensorMut::Bf16(d), TensorRef::Bf16(s)) => {
            d[at..at + n].copy_from_slice(&s[from..from + n])
        }
        (d, s) => {
            let vals: Vec<f32> = (from..from + n).map(|i| s.get_f32(i)).collect();
            d.write_f32(at, &vals);
        }
    }
}

/// Rotates the first `rot.dim` values of one head at position `pos`:
/// `x' = x cos - y sin`, `y' = x sin + y cos` on pairs `(2i, 2i+1)` or `(i, i + dim/2)`.
fn rotate(x: &mut [f32], pos: usize, rot: &Rotary) {
    let half = rot.dim / 2;
    let (cos, sin) = (
        &rot.cos[pos * half..][..half],
        &rot.sin[pos * half..][..half],
    );
    for i in 0..half {
        let (a, b) = if rot.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * cos[i] - xb * sin[i];
        x[b] = xa * sin[i] + xb * cos[i];
    }
}

/// q as the kernel reads it: `[batch, heads_kv, rows, d_pad]` f32, row `i * group + g` =
/// query row `i` of head `kv_head * group + g`, rotated (at `seqlens[b] + i` when causal or
/// windowed, else at `seqlens[b]`: FlashAttention's rule) and pre-scaled.
fn pack_q(c: &CheckedSpec<'_>, cache: &KvCache, q: Src<'_>) -> (Vec<f32>, usize) {
    let (hq, hkv, d, sq) = (c.heads_q, c.heads_kv, c.head_dim, c.seqlen_q);
    let (group, q_rows) = (c.group_size(), RowLayout::q(c));
    let d_pad = d.div_ceil(16) * 16;
    let rows = sq * group;
    // Scores come out in the log2 domain, unless softcap must see them at natural scale.
    let q_mul = if c.softcap > 0.0 {
        c.scale
    } else {
        c.scale * LOG2_E
    };
    let positional = c.causal || c.window != (-1, -1);
    let mut qp = vec![0.0f32; c.batch * hkv * rows * d_pad];
    for b in 0..c.batch {
        for i in 0..sq {
            for h in 0..hq {
                let r = i * group + h % group;
                let at = ((b * hkv + h / group) * rows + r) * d_pad;
                let row = &mut qp[at..at + d];
                q.read_row(q_rows.at(b * sq + i, h), row);
                if let Some(rot) = &cache.rotary {
                    let pos = cache.seqlens[b] as usize + if positional { i } else { 0 };
                    rotate(row, pos, rot);
                }
                for x in row.iter_mut() {
                    *x *= q_mul;
                }
            }
        }
    }
    (qp, d_pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_pairs_follow_the_style() {
        let rot = |interleaved| Rotary {
            cos: vec![0.0, 1.0],
            sin: vec![1.0, 0.0],
            dim: 4,
            interleaved,
        };
        // cos 0, sin 1 on pair 0 (a quarter turn); cos 1, sin 0 on pair 1 (identity).
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0];
        rotate(&mut x, 0, &rot(true));
        assert_eq!(x, [-2.0, 1.0, 3.0, 4.0, 5.0]);
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0];
        rotate(&mut x, 0, &rot(false));
        assert_eq!(x, [-3.0, 2.0, 1.0, 4.0, 5.0]);
    }
}
