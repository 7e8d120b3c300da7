//! FlashAttention's packed forms: q, k, v in one `[batch, seqlen, 3, heads, head_dim]` buffer
//! (`flash_attn_qkvpacked_func`) or k, v in one `[batch, seqlen_k, 2, heads_kv, head_dim]`
//! buffer (`flash_attn_kvpacked_func`); varlen `[total, 3, heads, head_dim]` and
//! `[total_k, 2, heads_kv, head_dim]`. Read in place through strides, never copied.

use crate::{attention, AttentionSpec, Error, InputStrides, Output, Result, Strides, TensorRef};

/// The spec and the q, k, v views that read a packed qkv buffer in place. `spec` is the
/// problem as for [`attention`] (one head count, one sequence length, `head_dim_v ==
/// head_dim`, no strides of its own for q, k, v). The backward of a packed call is
/// [`attention_backward`](crate::attention_backward) with this spec and these views.
pub fn qkv_packed_views<'a>(
    spec: &AttentionSpec,
    qkv: TensorRef<'a>,
) -> Result<(AttentionSpec, [TensorRef<'a>; 3])> {
    let why = "qkv packing needs it";
    same("heads_kv", spec.heads_kv, spec.heads_q, why)?;
    same("head_dim_v", spec.head_dim_v, spec.head_dim, why)?;
    match &spec.varlen {
        Some(v) if v.cu_seqlens_k != v.cu_seqlens_q => {
            return Err(Error::invalid(
                "varlen",
                format!("{:?}", v.cu_seqlens_k),
                "qkv packing needs cu_seqlens_k == cu_seqlens_q",
            ))
        }
        _ => same("seqlen_k", spec.seqlen_k, spec.seqlen_q, why)?,
    }
    unstrided(spec, [spec.strides.q, spec.strides.k, spec.strides.v])?;
    let st = packed_strides(spec, spec.seqlen_q, 3)?;
    let part = spec.heads_q * spec.head_dim;
    let strides = InputStrides {
        q: Some(st),
        k: Some(st),
        v: Some(st),
        ..spec.strides
    };
    let [q, k, v] = [0, 1, 2].map(|i| view("qkv", qkv, i * part));
    Ok((spec.clone().strides(strides), [q?, k?, v?]))
}

/// The spec and the k, v views that read a packed kv buffer in place; q keeps the spec's
/// own layout (contiguous, or its `strides.q`). Needs `head_dim_v == head_dim`.
pub fn kv_packed_views<'a>(
    spec: &AttentionSpec,
    kv: TensorRef<'a>,
) -> Result<(AttentionSpec, [TensorRef<'a>; 2])> {
    same(
        "head_dim_v",
        spec.head_dim_v,
        spec.head_dim,
        "kv packing needs it",
    )?;
    unstrided(spec, [None, spec.strides.k, spec.strides.v])?;
    let st = packed_strides(spec, spec.seqlen_k, 2)?;
    let strides = InputStrides {
        k: Some(st),
        v: Some(st),
        ..spec.strides
    };
    let part = spec.heads_kv * spec.head_dim;
    let [k, v] = [0, 1].map(|i| view("kv", kv, i * part));
    Ok((spec.clone().strides(strides), [k?, v?]))
}

/// Attention over a packed `[batch, seqlen, 3, heads, head_dim]` qkv buffer (see
/// [`qkv_packed_views`]) on the backend the runtime picks for strided inputs.
pub fn qkv_packed(spec: &AttentionSpec, qkv: TensorRef<'_>) -> Result<Output> {
    let (spec, [q, k, v]) = qkv_packed_views(spec, qkv)?;
    attention(&spec, q, k, v)
}

/// Attention of q over a packed `[batch, seqlen_k, 2, heads_kv, head_dim]` kv buffer (see
/// [`kv_packed_views`]).
pub fn kv_packed(spec: &AttentionSpec, q: TensorRef<'_>, kv: TensorRef<'_>) -> Result<Output> {
    let (spec, [k, v]) = kv_packed_views(spec, kv)?;
    attention(&spec, q, k, v)
}

/// Strides of one part of a `[.., seqlen, parts, heads, head_dim]` buffer (varlen: tokens).
fn packed_strides(spec: &AttentionSpec, seqlen: usize, parts: usize) -> Result<Strides> {
    let heads = if parts == 3 {
        spec.heads_q
    } else {
        spec.heads_kv
    };
    let token = parts
        .checked_mul(heads)
        .and_then(|n| n.checked_mul(spec.head_dim));
    let batch = token.and_then(|t| t.checked_mul(seqlen));
    match (token, batch) {
        (Some(token), Some(batch)) => Ok(Strides::new(batch, token, spec.head_dim)),
        _ => Err(Error::invalid(
            "shape",
            spec.shape_string(),
            "the packed buffer's strides overflow",
        )),
    }
}

fn view<'a>(name: &'static str, buf: TensorRef<'a>, offset: usize) -> Result<TensorRef<'a>> {
    buf.tail(offset).ok_or_else(|| {
        Error::argument(
            name,
            format!("{} elements", buf.len()),
            format!("too short for a packed buffer (a part starts at element {offset})"),
        )
    })
}

fn same(field: &'static str, value: usize, want: usize, why: &str) -> Result<()> {
    if value != want {
        return Err(Error::invalid(
            field,
            value,
            format!("must be {want}: {why}"),
        ));
    }
    Ok(())
}

/// The packed views set these strides themselves.
fn unstrided(spec: &AttentionSpec, set: [Option<Strides>; 3]) -> Result<()> {
    if set.iter().any(Option::is_some) {
        return Err(Error::invalid(
            "strides",
            format!("{:?}", spec.strides),
            "a packed buffer's views set their own strides; leave them unset",
        ));
    }
    Ok(())
}
