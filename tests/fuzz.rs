//! Spec validation under fuzzing: arbitrary values in every public field (zero, huge, negative,
//! NaN, inconsistent lengths, any KV-cache arguments) give a validated spec or an error naming
//! a field, never a panic; whatever validates has consistent sizes, and small ones run through
//! the facade and the f64 reference without a panic.

use flashattn::{
    random_inputs, reference_attention, reference_decode, AttentionSpec, CacheLayout, DType,
    ForwardInputs, KvCache, Rotary, Runtime,
};
use proptest::prelude::*;

/// Mostly plausible values with a hostile one now and then, for every field.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 1usize..5,
        4 => 0usize..70,
        1 => Just(usize::MAX),
        1 => Just(usize::MAX / 3),
        1 => Just(1usize << 32),
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => 0.0f32..40.0,
        1 => -2.0f32..0.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::MAX),
    ]
}

fn int32() -> impl Strategy<Value = i32> {
    prop_oneof![8 => 0i32..60, 1 => Just(-1i32), 1 => Just(i32::MAX), 1 => Just(i32::MIN)]
}

fn window() -> impl Strategy<Value = i64> {
    prop_oneof![6 => Just(-1i64), 4 => 0i64..50, 1 => Just(-3i64), 1 => Just(i64::MAX), 1 => Just(i64::MIN)]
}

fn ints(n: usize) -> impl Strategy<Value = Vec<i32>> {
    prop::collection::vec(int32(), 0..n)
}

/// Raw values; `Fields::apply` makes them consistent with the rest of the spec or not.
#[derive(Clone, Debug)]
struct Fields {
    consistent: bool,
    slopes: Vec<f32>,
    per_batch: bool,
    lens: Vec<i32>,
    cache: (bool, usize, usize, usize, Vec<i32>, Option<Vec<i32>>),
    rotary: Option<(usize, Vec<f32>, bool)>,
}

fn fields() -> impl Strategy<Value = Fields> {
    (
        prop::bool::weighted(0.8),
        (prop::collection::vec(float(), 0..12), any::<bool>()),
        ints(12),
        (
            any::<bool>(),
            size(),
            size(),
            size(),
            ints(40),
            prop::option::of(ints(8)),
        ),
        prop::option::of((
            size(),
            prop::collection::vec(float(), 0..400),
            any::<bool>(),
        )),
    )
        .prop_map(
            |(consistent, (slopes, per_batch), lens, cache, rotary)| Fields {
                consistent,
                slopes,
                per_batch,
                lens,
                cache,
                rotary,
            },
        )
}

/// `values` cycled to `n` entries when `consistent` (and `n` is small), else as they are.
fn fit<T: Clone>(values: &[T], n: usize, consistent: bool) -> Vec<T> {
    if consistent && !values.is_empty() && n <= 1 << 16 {
        values.iter().cycle().take(n).cloned().collect()
    } else {
        values.to_vec()
    }
}

/// Cache arguments from raw values; when `f.consistent`, shaped to mostly validate (lengths
/// within the capacity, distinct pages and cache rows, rotary tables long enough).
fn kv_cache(f: &Fields, batch: usize, head_dim: usize, seqlen_q: usize) -> KvCache {
    let (paged, a, b, new, table, batch_idx) = f.cache.clone();
    if !f.consistent {
        let layout = if paged {
            CacheLayout::Paged {
                num_blocks: a,
                page_size: b,
                block_table: table,
                max_blocks: new,
            }
        } else {
            CacheLayout::Contiguous {
                batch_cache: a,
                seqlen_cache: b,
            }
        };
        return KvCache {
            layout,
            seqlens: f.lens.clone(),
            batch_idx,
            seqlen_new: new,
            rotary: f.rotary.clone().map(|(dim, t, interleaved)| Rotary {
                dim,
                sin: t.clone(),
                cos: t,
                interleaved,
            }),
        };
    }
    let new = new % 4;
    let (page, max_blocks) = ((a % 17).max(1), (b % 8).max(1));
    let capacity = if paged {
        page * max_blocks
    } else {
        (b % 200).max(1)
    };
    let lens: Vec<i32> = fit(&f.lens, batch, true)
        .iter()
        .map(|l| l.rem_euclid((capacity.saturating_sub(new) + 1) as i32))
        .collect();
    let mut cache = if paged {
        let pages = batch.saturating_mul(max_blocks).min(1 << 12);
        let table = (0..pages as i32).rev().collect();
        KvCache::paged(pages + 1, page, table, max_blocks, lens)
    } else {
        KvCache::contiguous(batch, capacity, lens)
    };
    if let Some(idx) = batch_idx {
        cache.batch_idx = Some(if paged {
            idx
        } else {
            (0..batch.min(1 << 12) as i32).rev().collect()
        });
    }
    cache.seqlen_new = new;
    cache.rotary = f.rotary.clone().map(|(dim, t, interleaved)| {
        let dim = (dim % (head_dim / 2 + 1)).max(1) * 2;
        let n = capacity.saturating_add(seqlen_q).saturating_mul(dim / 2);
        let t = fit(&t, n, true);
        Rotary {
            dim,
            sin: t.clone(),
            cos: t,
            interleaved,
        }
    });
    cache
}

fn arbitrary_spec() -> impl Strategy<Value = AttentionSpec> {
    (
        (size(), size(), size(), size(), size(), size(), size()),
        (
            prop::sample::select(DType::ALL.to_vec()),
            prop::option::weighted(0.2, float()),
        ),
        prop_oneof![3 => Just(0.0f32), 1 => float()],
        (any::<bool>(), window(), window()),
        (0u8..10, fields()),
    )
        .prop_map(
            |(
                (b, hkv, group, sq, sk, d, dv),
                (dtype, scale),
                softcap,
                (causal, l, r),
                (kind, f),
            )| {
                let hq = hkv.saturating_mul(if f.consistent { group.min(4) } else { group });
                let mut spec = AttentionSpec::new(b, hq, sq, sk, d)
                    .heads_kv(hkv)
                    .head_dim_v(dv)
                    .dtype(dtype)
                    .causal(causal)
                    .window(l, r)
                    .softcap(softcap)
                    .return_lse(true);
                spec.scale = scale;
                match kind {
                    0..=2 => {
                        let n = if f.per_batch {
                            b.saturating_mul(hq)
                        } else {
                            hq
                        };
                        spec = spec.alibi(fit(&f.slopes, n, f.consistent), f.per_batch);
                    }
                    3..=4 => {
                        let mut cu = vec![0i32];
                        for len in &f.lens {
                            cu.push(cu[cu.len() - 1].saturating_add(len.rem_euclid(40)));
                        }
                        let raw = f.lens.clone();
                        let (cq, ck) = if f.consistent {
                            (cu.clone(), cu)
                        } else {
                            (raw.clone(), raw)
                        };
                        let (tq, tk) = (sq, sk);
                        spec = spec.varlen(cq, ck);
                        if f.consistent {
                            spec.seqlen_q = tq.max(
                                spec.varlen
                                    .as_ref()
                                    .map_or(0, |v| *v.cu_seqlens_q.last().unwrap_or(&0) as usize),
                            );
                            spec.seqlen_k = tk.max(spec.seqlen_q);
                        }
                    }
                    5..=7 => spec.kv_cache = Some(kv_cache(&f, b, d, sq)),
                    _ => {}
                }
                spec
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn any_fields_validate_or_name_the_bad_one(spec in arbitrary_spec()) {
        let Ok(c) = spec.validate() else { return Ok(()) };
        // A validated spec's derived numbers are consistent and cost nothing to compute.
        let s = c.sizes;
        prop_assert_eq!(Some(s.q), spec.q_elems());
        prop_assert_eq!(Some(s.out), spec.out_elems());
        let (max_q, max_k) = spec.max_lens();
        prop_assert_eq!((max_q, max_k), (s.max_q_len, s.max_k_len));
        let _ = (spec.visible_pairs(), spec.flops(), spec.backward_flops(), spec.to_string());
        for b in 0..spec.batch.min(8) {
            let seq = spec.seq(b);
            prop_assert!(seq.q_len <= max_q && seq.k_len <= max_k);
        }
        // Small problems run: the reference, and the facade (an error is fine, a panic is not).
        let small = s.q.max(s.k).max(s.v) <= 40_000 && s.max_q_len * s.max_k_len <= 20_000;
        if !small {
            return Ok(());
        }
        let (q, k, v) = random_inputs(&spec, 1);
        if spec.kv_cache.is_some() {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(2);
            let k_new = flashattn::random_tensor(&mut rng, spec.dtype, s.k_new);
            let v_new = flashattn::random_tensor(&mut rng, spec.dtype, s.v_new);
            let has_new = s.k_new > 0;
            let r = reference_decode(
                &spec,
                q.as_ref(),
                k.as_ref(),
                v.as_ref(),
                has_new.then(|| k_new.as_ref()),
                has_new.then(|| v_new.as_ref()),
            );
            prop_assert!(r.is_ok(), "{:?}", r.err());
        } else {
            let r = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref());
            prop_assert!(r.is_ok(), "{:?}", r.err());
            let cpu = Runtime::global().backend("cpu").unwrap();
            if cpu.supports(&spec).is_ok() {
                let _ = cpu.forward(&spec, ForwardInputs::of(&q, &k, &v));
            }
        }
    }
}
