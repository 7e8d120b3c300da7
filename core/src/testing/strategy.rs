//! The one proptest strategy for random specs, shared by every backend's tests: odd sizes
//! (1, 17, 129), head dims 40/72/200 and the rest, GQA, every mask, softcap, ALiBi (per head
//! and per batch) and varlen (with trailing tokens outside every sequence).

use crate::{AttentionSpec, DType};
use proptest::prelude::*;

/// Head dims drawn by [`specs`]: odd and even, small and at the limit.
pub const HEAD_DIMS: [usize; 8] = [8, 16, 40, 64, 72, 128, 200, 256];

/// What a backend's random specs may contain.
#[derive(Clone, Debug)]
pub struct SpecSpace {
    pub dtypes: Vec<DType>,
    pub head_dims: Vec<usize>,
    /// Largest batch (1..=max_batch).
    pub max_batch: usize,
    /// Sequence lengths are 1, 17, 129 or drawn from 1..max_seqlen.
    pub max_seqlen: usize,
}

impl SpecSpace {
    /// The given dtypes; every head dim; batch up to 3; lengths up to 150.
    pub fn new(dtypes: &[DType]) -> SpecSpace {
        SpecSpace {
            dtypes: dtypes.to_vec(),
            head_dims: HEAD_DIMS.to_vec(),
            max_batch: 3,
            max_seqlen: 150,
        }
    }
}

fn seqlen(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(17), Just(129), 1usize..max.max(2)]
}

fn window() -> impl Strategy<Value = (i64, i64)> {
    prop_oneof![
        3 => Just((-1i64, -1i64)),
        1 => (-1i64..40, -1i64..40),
    ]
}

/// Random valid specs from `space`, every one with `return_lse`.
pub fn specs(space: SpecSpace) -> impl Strategy<Value = AttentionSpec> {
    let max_batch = space.max_batch.max(1);
    (
        (
            1usize..=max_batch,
            1usize..=3,
            prop_oneof![Just(1usize), Just(2), Just(3)],
        ),
        (seqlen(space.max_seqlen), seqlen(space.max_seqlen)),
        (
            prop::sample::select(space.head_dims.clone()),
            prop::option::weighted(0.3, prop::sample::select(space.head_dims)),
        ),
        prop::sample::select(space.dtypes),
        (
            any::<bool>(),
            window(),
            prop_oneof![3 => Just(0.0f32), 1 => 0.5f32..30.0],
        ),
        prop::option::weighted(0.25, prop::collection::vec(0.0f32..1.0, 3 * 9)),
        prop::option::weighted(
            0.3,
            prop::collection::vec((0usize..60, 0usize..60), max_batch),
        ),
        0usize..3,
    )
        .prop_map(
            move |(
                (batch, heads_kv, group),
                (sq, sk),
                (d, dv),
                dtype,
                (causal, window, softcap),
                alibi,
                varlen,
                extra_tokens,
            )| {
                let heads_q = heads_kv * group;
                let mut spec = AttentionSpec::new(batch, heads_q, sq, sk, d)
                    .heads_kv(heads_kv)
                    .head_dim_v(dv.unwrap_or(d))
                    .dtype(dtype)
                    .causal(causal)
                    .window(window.0, window.1)
                    .softcap(softcap)
                    .return_lse(true);
                if let Some(lens) = varlen {
                    let (mut cq, mut ck) = (vec![0i32], vec![0i32]);
                    for &(q, k) in &lens[..batch] {
                        cq.push(cq[cq.len() - 1] + q as i32);
                        ck.push(ck[ck.len() - 1] + k as i32);
                    }
                    let (tq, tk) = (cq[batch] as usize, ck[batch] as usize);
                    spec = spec.varlen(cq, ck);
                    spec.seqlen_q = (tq + extra_tokens).max(1);
                    spec.seqlen_k = (tk + extra_tokens).max(1);
                }
                if let Some(slopes) = alibi {
                    let per_batch = slopes[0] > 0.5;
                    let n = if per_batch {
                        spec.batch * heads_q
                    } else {
                        heads_q
                    };
                    spec = spec.alibi(slopes[..n].to_vec(), per_batch);
                }
                spec
            },
        )
}
