//! Large problems: a tensor larger than the adapter's storage binding limit, and long key
//! sequences (tens of thousands of keys per sequence, prefill- and decode-shaped, every dtype),
//! which one workgroup must never walk alone (llvmpipe's loop-iteration cap made the unbounded
//! kernel silently wrong from ~12k keys).

mod common;

use common::assert_cases;
use flashattn_core::testing::check_backend;
use flashattn_core::{AttentionSpec, DType};

#[test]
fn q_larger_than_the_binding_limit() {
    let Some(b) = common::backend() else { return };
    let limit = b.max_binding_bytes();
    if limit > 512 << 20 {
        eprintln!("SKIP: binding limit {limit} bytes; a larger-than-limit q would not fit the test's time");
        return;
    }
    let (heads, dim) = (16usize, 64usize);
    let row = (heads * dim * 4) as u64;
    let seqlen_q = (limit / row) as usize + 1000;
    // Few keys: the size is in q and out, the compute stays small.
    // Unmasked: every row sees every key, so every q/out chunk carries real values.
    let spec = AttentionSpec::new(1, heads, seqlen_q, 48, dim).return_lse(true);
    eprintln!(
        "{spec}: q = {} bytes, binding limit {limit}",
        spec.q_elems().unwrap() * 4
    );
    let r = check_backend(b, &spec, 5).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("rel_l2 {:.2e}", r.rel_l2);
}

#[test]
fn long_key_sequences_match_the_reference() {
    let Some(b) = common::backend() else { return };
    let lse = |s: AttentionSpec| s.return_lse(true);
    let mut cases = vec![
        // The reported failure: 130 queries (3 query blocks, so no split-KV) x 16000 keys.
        ("130 x 16000", lse(AttentionSpec::new(1, 2, 130, 16000, 64))),
        // Decode-shaped: one query against 100k keys (split-KV and passes), bf16.
        (
            "1 x 100000 bf16",
            lse(AttentionSpec::new(1, 2, 1, 100_000, 64).dtype(DType::Bf16)),
        ),
        // Causal, bottom-right aligned: 257 rows over 40000 keys, head_dim 128 (the most
        // loop iterations per key).
        (
            "causal 257 x 40000 d128",
            lse(AttentionSpec::new(1, 1, 257, 40_000, 128).causal(true)),
        ),
        // A window across slice boundaries, GQA, ALiBi, softcap.
        (
            "window gqa alibi softcap 70 x 20000",
            lse(AttentionSpec::new(1, 4, 70, 20_000, 32)
                .heads_kv(2)
                .window(3000, 500)
                .alibi(vec![0.01, 0.02, 0.005, 0.0], false)
                .softcap(8.0)),
        ),
    ];
    if b.has_f16() {
        cases.push((
            "f16 varlen 2 x (40 x 18000)",
            lse(AttentionSpec::new(1, 2, 80, 36_000, 64)
                .dtype(DType::F16)
                .varlen(vec![0, 40, 80], vec![0, 18_000, 36_000])),
        ));
    }
    assert_cases(b, &cases, 40, check_backend);
}
