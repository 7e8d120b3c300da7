//! Decode cases every backend runs against the f64 reference: caches of every layout
//! (contiguous, paged with a shuffled block table), rotary tables, and the named feature cases.

use crate::{
    random_inputs, random_tensor, reference_attention, reference_decode, rel_l2_error,
    AttentionSpec, Backend, CacheConfig, DType, DecodeInputs, DecodeStep, ForwardInputs, KvCache,
    ReferenceDecode, Result, Rotary, Tensor, TensorRef,
};
use rand::SeedableRng;

/// Random host tensors of one decode call of a spec: q, both caches, and the new rows
/// (empty when the step appends none).
pub struct DecodeData {
    pub q: Tensor,
    pub k_cache: Tensor,
    pub v_cache: Tensor,
    pub k_new: Tensor,
    pub v_new: Tensor,
}

impl DecodeData {
    pub fn random(spec: &AttentionSpec, seed: u64) -> DecodeData {
        let (q, k_cache, v_cache) = random_inputs(spec, seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xdec0de);
        let k_new = random_tensor(&mut rng, spec.dtype, spec.k_new_elems().unwrap_or(0));
        let v_new = random_tensor(&mut rng, spec.dtype, spec.v_new_elems().unwrap_or(0));
        DecodeData {
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
        }
    }

    /// The new k and v rows, when the step appends any.
    pub fn new_rows(&self) -> Option<(&Tensor, &Tensor)> {
        (!self.k_new.is_empty()).then_some((&self.k_new, &self.v_new))
    }

    /// The call's inputs, with `caches` (copies of the caches) to append to.
    pub fn inputs<'a>(&'a self, caches: (&'a mut Tensor, &'a mut Tensor)) -> DecodeInputs<'a> {
        DecodeInputs::of(&self.q, caches, self.new_rows())
    }

    /// The f64 reference of the call: out, LSE and both caches after the append.
    pub fn reference(&self, spec: &AttentionSpec) -> Result<ReferenceDecode> {
        let new = self.new_rows();
        reference_decode(
            spec,
            self.q.as_ref(),
            self.k_cache.as_ref(),
            self.v_cache.as_ref(),
            new.map(|(k, _)| k.as_ref()),
            new.map(|(_, v)| v.as_ref()),
        )
    }
}

/// A contiguous cache with `extra` spare rows per sequence beyond the longest use.
pub fn contiguous(seqlens: &[i32], new: usize, extra: usize) -> KvCache {
    let cap = seqlens.iter().map(|&l| l as usize).max().unwrap_or(0) + new + extra;
    KvCache::contiguous(seqlens.len(), cap, seqlens.to_vec()).seqlen_new(new)
}

/// A paged cache of `page`-row pages, each sequence's pages scattered over the pool (a
/// fixed shuffle), with room for `extra` more rows.
pub fn paged(seqlens: &[i32], new: usize, page: usize, extra: usize) -> KvCache {
    let cap = seqlens.iter().map(|&l| l as usize).max().unwrap_or(0) + new + extra;
    let per_seq = cap.div_ceil(page);
    let blocks = per_seq * seqlens.len() + 3;
    let mut pool: Vec<i32> = (0..blocks as i32).collect();
    let mut x = 0x9e37_79b9u64;
    for i in (1..pool.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        pool.swap(i, (x >> 33) as usize % (i + 1));
    }
    let table = pool[..per_seq * seqlens.len()].to_vec();
    KvCache::paged(blocks, page, table, per_seq, seqlens.to_vec()).seqlen_new(new)
}

/// cos / sin tables for `positions` positions of a `dim`-wide rotation.
pub fn rotary(dim: usize, positions: usize, interleaved: bool) -> Rotary {
    let half = dim / 2;
    let angle = |p: usize, i: usize| p as f32 * 10000f32.powf(-((2 * i) as f32) / dim as f32);
    let table = |f: fn(f32) -> f32| {
        (0..positions * half)
            .map(|k| f(angle(k / half, k % half)))
            .collect()
    };
    Rotary {
        cos: table(f32::cos),
        sin: table(f32::sin),
        dim,
        interleaved,
    }
}

/// A decode problem: `hq` / `hkv` heads, `sq` query rows, head dim `d`, against `cache`.
pub fn spec(hq: usize, hkv: usize, sq: usize, d: usize, cache: KvCache) -> AttentionSpec {
    AttentionSpec::new(cache.seqlens.len(), hq, sq, 1, d)
        .heads_kv(hkv)
        .causal(true)
        .return_lse(true)
        .kv_cache(cache)
}

/// The named decode cases every backend must pass (cache lengths 0 / 1 / 17 / 1000, page
/// sizes 1 / 3 / 16 / 256, appends across pages, GQA 32/8 and MQA, every mask and score
/// feature, rotary both styles), for `dtype`.
pub fn decode_cases(dtype: DType) -> Vec<(&'static str, AttentionSpec)> {
    layout_and_mask_cases()
        .into_iter()
        .chain(score_and_cache_feature_cases())
        .map(|(name, s)| (name, s.dtype(dtype)))
        .collect()
}

/// Cache lengths, page sizes, appends, head groups and masks.
fn layout_and_mask_cases() -> Vec<(&'static str, AttentionSpec)> {
    let lens = [0, 1, 17, 1000];
    vec![
        (
            "contiguous 0/1/17/1000, GQA 32/8",
            spec(32, 8, 1, 64, contiguous(&lens, 1, 3)),
        ),
        ("page 1", spec(4, 2, 1, 64, paged(&lens, 1, 1, 0))),
        (
            "page 3, append of 4 across pages",
            spec(4, 2, 1, 40, paged(&[2, 5, 0, 30], 4, 3, 2)),
        ),
        (
            "page 16, 15 + 3 crosses a page",
            spec(4, 2, 1, 64, paged(&[15, 1000, 17], 3, 16, 0)),
        ),
        (
            "page 256",
            spec(8, 2, 1, 72, paged(&[0, 255, 1000], 1, 256, 0)),
        ),
        ("MQA", spec(8, 1, 1, 128, contiguous(&[300, 17], 1, 0))),
        ("attend only", spec(4, 2, 1, 64, paged(&lens, 0, 16, 0))),
        (
            "not causal, 3 query rows",
            spec(4, 2, 3, 64, contiguous(&[50, 9], 0, 1)).causal(false),
        ),
        (
            "causal, 4 new rows and queries",
            spec(4, 2, 4, 64, paged(&[100, 0, 3], 4, 16, 0)),
        ),
        (
            "window",
            spec(4, 2, 2, 64, contiguous(&lens, 2, 0)).window(50, 0),
        ),
        (
            "window both sides, not causal",
            spec(4, 4, 5, 32, paged(&[300, 4], 0, 3, 0))
                .causal(false)
                .window(7, 2),
        ),
    ]
}

/// Softcap, ALiBi, a narrower v, a custom scale, batch_idx and rotary.
fn score_and_cache_feature_cases() -> Vec<(&'static str, AttentionSpec)> {
    vec![
        (
            "softcap",
            spec(4, 2, 1, 64, contiguous(&[400, 3], 1, 0)).softcap(3.0),
        ),
        (
            "alibi per batch",
            spec(4, 2, 2, 64, paged(&[400, 30], 2, 16, 0))
                .alibi(vec![0.1, 0.02, 0.3, 0.05, 0.01, 0.2, 0.04, 0.08], true),
        ),
        (
            "head_dim_v differs, d 200",
            spec(4, 2, 1, 200, contiguous(&[100, 1], 1, 0)).head_dim_v(72),
        ),
        (
            "custom scale",
            spec(2, 1, 1, 16, contiguous(&[33], 1, 0)).scale(0.7),
        ),
        (
            "batch_idx",
            spec(
                4,
                2,
                1,
                64,
                KvCache::contiguous(5, 260, vec![100, 0, 250])
                    .seqlen_new(1)
                    .batch_idx(vec![4, 0, 2]),
            ),
        ),
        (
            "batch_idx repeated, attend only",
            spec(
                4,
                2,
                1,
                64,
                KvCache::contiguous(3, 40, vec![30, 12]).batch_idx(vec![1, 1]),
            ),
        ),
        (
            "rotary interleaved, causal: q at its own positions",
            spec(
                4,
                2,
                3,
                64,
                paged(&[40, 0], 3, 16, 0).rotary(rotary(64, 43, true)),
            ),
        ),
        (
            "rotary half-split, not causal: q at seqlens",
            spec(
                4,
                2,
                2,
                64,
                contiguous(&[40, 5], 2, 0).rotary(rotary(32, 42, false)),
            )
            .causal(false),
        ),
        (
            "rotary half-split, window, dim = d",
            spec(
                2,
                1,
                2,
                48,
                contiguous(&[20], 2, 0).rotary(rotary(48, 22, false)),
            )
            .window(5, -1),
        ),
    ]
}

/// Rotation as the reference defines it, in f32 arithmetic (a backend's f32 rotation of a
/// cache row must match it bit for bit: the cache read-back compares exactly).
pub fn rotate(x: &mut [f32], pos: usize, r: &Rotary) {
    let half = r.dim / 2;
    for i in 0..half {
        let (c, s) = (r.cos[pos * half + i], r.sin[pos * half + i]);
        let (a, b) = if r.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * c - xb * s;
        x[b] = xa * s + xb * c;
    }
}

/// Every row appended to a handle, as the cache should hold it (`[batch][token][heads_kv * d]`,
/// rounded to the dtype, k rotated at its position).
struct Appended {
    dtype: DType,
    row: usize,
    head_dim: usize,
    rotary: Option<Rotary>,
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
}

impl Appended {
    /// Keeps the `n` rows per sequence of `k` and `v` (`[batch, n, heads_kv, d]`), k rotated
    /// at positions `at..` where given.
    fn keep(&mut self, (k, v): (&Tensor, &Tensor), n: usize, at: Option<usize>) {
        let (k, v) = (k.to_f32_vec(), v.to_f32_vec());
        for b in 0..self.k.len() {
            for i in 0..n {
                let span = (b * n + i) * self.row..(b * n + i + 1) * self.row;
                let mut kr = k[span.clone()].to_vec();
                if let (Some(r), Some(at)) = (&self.rotary, at) {
                    for head in kr.chunks_mut(self.head_dim) {
                        rotate(head, at + i, r);
                    }
                }
                let round = |x: &[f32]| Tensor::from_f32(self.dtype, x).to_f32_vec();
                self.k[b].push(round(&kr));
                self.v[b].push(round(&v[span]));
            }
        }
    }

    /// k and v as dense `[batch, len, heads_kv, d]` f32.
    fn dense(&self) -> (Vec<f32>, Vec<f32>) {
        let flat = |h: &[Vec<Vec<f32>>]| h.iter().flatten().flatten().copied().collect();
        (flat(&self.k), flat(&self.v))
    }
}

/// A handle appends one token per step and attends; every step equals a prefill over the
/// same prefix (the f64 reference and the backend's forward), and the cache holds what was appended.
/// Panics on the first mismatch. `page`: paged with that page size, else contiguous; `rot`:
/// rotary, interleaved or not. The prefill runs on `backend`'s forward too.
pub fn decode_steps_equal_prefills(
    backend: &dyn Backend,
    dtype: DType,
    page: Option<usize>,
    rot: Option<bool>,
    steps: usize,
) {
    let (batch, hq, hkv, d, prompt) = (2, 4, 2, 32, 5);
    let mut config = CacheConfig::contiguous(batch, prompt + steps, hkv, d).dtype(dtype);
    config.page_size = page;
    let mut cache = backend.kv_cache(config).unwrap();
    let mut appended = Appended {
        dtype,
        row: hkv * d,
        head_dim: d,
        rotary: rot.map(|interleaved| rotary(16, prompt + steps, interleaved)),
        k: vec![Vec::new(); batch],
        v: vec![Vec::new(); batch],
    };
    let rows = |n: usize, seed: u64| {
        let (_, k, v) = random_inputs(&AttentionSpec::new(batch, hkv, n, n, d).dtype(dtype), seed);
        (k, v)
    };
    // The prompt: appended without rotation (append takes rows as they are).
    let (k, v) = rows(prompt, 1);
    cache.append(k.as_ref(), v.as_ref()).unwrap();
    appended.keep((&k, &v), prompt, None);
    for step in 0..steps {
        let len = prompt + step;
        let (k, v) = rows(1, 100 + step as u64);
        let q_spec = AttentionSpec::new(batch, hq, 1, 1, d).dtype(dtype);
        let (q, _, _) = random_inputs(&q_spec, 900 + step as u64);
        let mut ds = DecodeStep::new(hq);
        ds.return_lse = true;
        ds.rotary = appended.rotary.clone();
        let got = cache
            .decode(&ds, q.as_ref(), Some(k.as_ref()), Some(v.as_ref()))
            .unwrap();
        assert_eq!(cache.state().seqlens(), &[len as i32 + 1; 2]);
        appended.keep((&k, &v), 1, Some(len));
        // The same step as a prefill: q rotated at its position, all len + 1 keys.
        let mut qr = q.to_f32_vec();
        if let Some(r) = &appended.rotary {
            for head in qr.chunks_mut(d) {
                rotate(head, len, r);
            }
        }
        let dense = AttentionSpec::new(batch, hq, 1, len + 1, d)
            .heads_kv(hkv)
            .causal(true)
            .return_lse(true);
        let what = format!("{dtype} step {step}");
        check_step(backend, &dense, &qr, &appended, &got, &what);
    }
    // read(): the buffers hold what was appended, where the state put it.
    let (kb, _) = cache.read().unwrap();
    let kb = kb.to_f32_vec();
    let spec = cache.state().spec(&DecodeStep::new(hq), 0).unwrap();
    let kvc = spec.kv_cache.unwrap();
    for (b, seq) in appended.k.iter().enumerate() {
        for (t, row) in seq.iter().enumerate() {
            let at = kvc.row(b, t) * hkv * d;
            assert_eq!(&kb[at..at + hkv * d], &row[..], "{dtype} seq {b} row {t}");
        }
    }
    cache.reset(0).unwrap();
    assert_eq!(cache.state().seqlens(), &[0, (prompt + steps) as i32]);
}

/// One decode step's output `got` equals the f64 reference and the backend's own forward on
/// the dense prefix (`dense`, q already rotated).
fn check_step(
    backend: &dyn Backend,
    dense: &AttentionSpec,
    q: &[f32],
    appended: &Appended,
    got: &crate::Output,
    what: &str,
) {
    let dtype = appended.dtype;
    let (kf, vf) = appended.dense();
    let (q, k, v) = (TensorRef::F32(q), TensorRef::F32(&kf), TensorRef::F32(&vf));
    let want = reference_attention(dense, q, k, v).unwrap();
    let prefill = backend.forward(dense, ForwardInputs { q, k, v }).unwrap();
    let tol = dtype.tolerance();
    let out = got.out.to_f32_vec();
    let err = rel_l2_error(&out, &want.out);
    assert!(err < tol, "{what}: {err:.2e} vs the reference");
    let pre: Vec<f64> = prefill.out.to_f32_vec().iter().map(|&x| x as f64).collect();
    let err = rel_l2_error(&out, &pre);
    assert!(err < tol, "{what}: {err:.2e} vs the backend's prefill");
    let lse = got.lse.as_ref().unwrap();
    for (a, e) in lse.iter().zip(&want.lse) {
        assert!((*a as f64 - e).abs() < dtype.lse_tolerance(), "{what} LSE");
    }
}

/// A handle refuses a page size of 0, an overflowing append and a bad `k_new` with a typed
/// error, leaving its buffers and lengths as they were; the next good step runs. Panics on a
/// failure.
pub fn handle_refuses_bad_steps(backend: &dyn Backend) {
    let e = backend
        .kv_cache(CacheConfig::contiguous(1, 10, 2, 8).paged(0))
        .err()
        .expect("page_size 0");
    assert!(e.to_string().contains("cache.page_size"), "{e}");
    let mut cache = backend
        .kv_cache(CacheConfig::contiguous(2, 6, 2, 8).paged(4))
        .unwrap();
    let rows = |n: usize| {
        let (_, k, v) = random_inputs(&AttentionSpec::new(2, 2, n, n, 8), n as u64);
        (k, v)
    };
    let (k, v) = rows(5);
    cache.append(k.as_ref(), v.as_ref()).unwrap();
    let before = cache.read().unwrap();
    let (k, v) = rows(2);
    let e = cache.append(k.as_ref(), v.as_ref()).unwrap_err();
    assert!(e.to_string().contains("seqlen_new = 2"), "{e}");
    let q = Tensor::zeros(DType::F32, 2 * 4 * 8);
    let e = cache
        .decode(
            &DecodeStep::new(4),
            q.as_ref(),
            Some(k.as_ref()),
            Some(v.as_ref()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    let odd = Tensor::zeros(DType::F32, 2 * 2 * 8 + 1);
    let e = cache
        .decode(
            &DecodeStep::new(4),
            q.as_ref(),
            Some(odd.as_ref()),
            Some(v.as_ref()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("k_new"), "{e}");
    assert_eq!(cache.state().seqlens(), &[5, 5]);
    assert!(
        cache.read().unwrap() == before,
        "a refused step wrote the cache"
    );
    // One more row fits; the step attends over 6 keys.
    let (k, v) = rows(1);
    let out = cache
        .decode(
            &DecodeStep::new(4),
            q.as_ref(),
            Some(k.as_ref()),
            Some(v.as_ref()),
        )
        .unwrap();
    assert_eq!(out.out.len(), 2 * 4 * 8);
    assert_eq!(cache.state().seqlens(), &[6, 6]);
}

/// NaN in q or a visible key makes exactly the rows that see it NaN; a NaN in a V row that
/// the causal mask hides from a row leaves that row finite.
/// (2 query rows x 2 heads on one KV head, 6 cached keys + 2 new, f32.) Panics naming
/// `label` when a row is wrong.
pub fn decode_nan_reaches_exactly_the_rows_that_see_it(backend: &dyn Backend, label: &str) {
    let spec = spec(2, 1, 2, 16, contiguous(&[6], 2, 0));
    let (q, kc, vc) = random_inputs(&spec, 3);
    let rows = AttentionSpec::new(1, 1, 2, 2, 16);
    let (_, kn, mut vn) = random_inputs(&rows, 4);
    let mut qv = q.to_f32_vec();
    qv[16 + 5] = f32::NAN; // row 0, head 1
    if let Tensor::F32(v) = &mut vn {
        v[16 + 3] = f32::NAN; // the last new key: hidden from row 0
    }
    let (mut kc, mut vc) = (kc.clone(), vc.clone());
    let out = backend
        .decode(
            &spec,
            DecodeInputs {
                q: TensorRef::F32(&qv),
                k_cache: kc.as_mut(),
                v_cache: vc.as_mut(),
                k_new: Some(kn.as_ref()),
                v_new: Some(vn.as_ref()),
            },
        )
        .unwrap();
    let o = out.out.to_f32_vec();
    let lse = out.lse.unwrap();
    let row_nan = |i: usize, h: usize| o[(i * 2 + h) * 16..][..16].iter().all(|x| x.is_nan());
    let row_finite = |i: usize, h: usize| o[(i * 2 + h) * 16..][..16].iter().all(|x| x.is_finite());
    assert!(
        row_finite(0, 0) && lse[0].is_finite(),
        "[{label}] row 0 head 0: {o:?}"
    );
    assert!(row_nan(0, 1) && lse[2].is_nan(), "[{label}] row 0 head 1");
    // Row 1 sees the NaN value element: that output element is NaN, the others finite.
    let only_3 = |h: usize| {
        let r = &o[(2 + h) * 16..][..16];
        r.iter().enumerate().all(|(x, v)| v.is_nan() == (x == 3))
    };
    assert!(
        only_3(0) && only_3(1),
        "[{label}] row 1 sees the NaN value: {:?}",
        &o[32..]
    );
    assert!(
        lse[1].is_finite() && lse[3].is_finite(),
        "[{label}] NaN V leaves the LSE"
    );
}
