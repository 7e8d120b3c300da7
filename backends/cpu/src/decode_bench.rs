//! `Backend::bench` for decode steps (`Pass::Decode`): random caches stay resident, each run
//! is one step. The spec is fixed, so every run appends the same rows at the same positions
//! (the cache never overflows). `Algorithm::Copy` copies the bytes of K and V the step reads
//! (`decode_bytes`) on the same threads: the memory-bandwidth limit beside the step.

use crate::bench::{time_runs, Bench};
use crate::thread_pool::ThreadPool;
use flashattn_core::{
    random_inputs, validate_decode_inputs, Algorithm, AttentionSpec, Backend, BenchMeasure,
    DecodeInputs, Error, Result, Tensor,
};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest piece of one copy task (bytes).
const COPY_PIECE: usize = 256 << 10;

impl Bench<'_> {
    /// Times decode steps (`algo` Flash) or the copy of the bytes a step reads (Copy).
    pub(crate) fn decode(&self, progress: &mut dyn FnMut()) -> Result<BenchMeasure> {
        let Bench {
            backend,
            spec,
            algo,
            plan,
        } = *self;
        backend.supports_decode(spec)?;
        let (q, mut kc, mut vc) = random_inputs(spec, plan.seed);
        let new = spec.kv_cache.as_ref().map_or(0, |c| c.seqlen_new);
        let has_new = new > 0;
        // New rows [batch, new, heads_kv, d / dv]: the k and v of a problem of that shape.
        let rows_spec = AttentionSpec::new(spec.batch, spec.heads_kv, new, new, spec.head_dim)
            .head_dim_v(spec.head_dim_v)
            .dtype(spec.dtype);
        let (_, k_new, v_new) = random_inputs(&rows_spec, plan.seed ^ 0xdec0de);
        let copy = match algo {
            Algorithm::Flash => None,
            Algorithm::Copy => {
                let inputs =
                    DecodeInputs::of(&q, (&mut kc, &mut vc), has_new.then_some((&k_new, &v_new)));
                validate_decode_inputs(spec, &inputs)?;
                Some(CopyPlan::new(spec, &kc, &vc))
            }
            Algorithm::Naive => {
                return Err(Error::unsupported(
                    "cpu",
                    "decode has no naive peer; compare with --algo copy (the bandwidth limit)",
                ))
            }
        };
        let out_bytes = spec.out_elems().unwrap_or(0) as u64
            * spec.dtype.output().size_bytes() as u64
            + if spec.return_lse {
                spec.lse_elems().unwrap_or(0) as u64 * 4
            } else {
                0
            };
        time_runs(plan, out_bytes, progress, || {
            Ok(match &copy {
                Some(c) => {
                    c.run(&backend.pool, &kc, &vc);
                    None
                }
                None => Some(backend.decode(
                    spec,
                    DecodeInputs::of(&q, (&mut kc, &mut vc), has_new.then_some((&k_new, &v_new))),
                )?),
            })
        })
    }
}

/// The byte ranges of the K and V caches a decode step reads, cut into pieces, and the
/// buffer they are copied into.
pub(crate) struct CopyPlan {
    /// (from the k cache?, source byte offset, length, destination offset).
    pieces: Vec<(bool, usize, usize, usize)>,
    dst: std::sync::Mutex<Vec<u8>>,
}

impl CopyPlan {
    /// Requires a validated decode spec whose caches are `k` and `v`.
    pub fn new(spec: &AttentionSpec, k: &Tensor, v: &Tensor) -> CopyPlan {
        let mut pieces = Vec::new();
        let mut total = 0;
        if let Some(cache) = &spec.kv_cache {
            let mask = spec.mask();
            let es = spec.dtype.size_bytes();
            let kb = spec.heads_kv * spec.head_dim * es;
            let vb = spec.heads_kv * spec.head_dim_v * es;
            debug_assert_eq!(k.len() * es / kb.max(1), v.len() * es / vb.max(1));
            for b in 0..spec.batch {
                let sq = spec.seqlen_q;
                let keys = mask.keys_of_rows(0..sq, sq, cache.keys(b));
                // Runs of consecutive cache rows (a contiguous cache gives one per entry).
                let mut j = keys.start;
                while j < keys.end {
                    let first = cache.row(b, j);
                    let mut n = 1;
                    while j + n < keys.end && cache.row(b, j + n) == first + n {
                        n += 1;
                    }
                    for (is_k, row_bytes) in [(true, kb), (false, vb)] {
                        let (start, len) = (first * row_bytes, n * row_bytes);
                        for at in (0..len).step_by(COPY_PIECE) {
                            let piece = COPY_PIECE.min(len - at);
                            pieces.push((is_k, start + at, piece, total));
                            total += piece;
                        }
                    }
                    j += n;
                }
            }
        }
        CopyPlan {
            pieces,
            dst: std::sync::Mutex::new(vec![1u8; total]),
        }
    }

    /// Bytes one run copies.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.2).sum()
    }

    /// Copies every piece, the pool's threads pulling pieces from a shared counter.
    pub fn run(&self, pool: &ThreadPool, k: &Tensor, v: &Tensor) {
        let (k, v) = (k.as_ref(), v.as_ref());
        let (k, v) = (k.as_bytes(), v.as_bytes());
        let mut guard = self.dst.lock().unwrap_or_else(|e| e.into_inner());
        let dst = DstPtr(guard.as_mut_ptr());
        let next = AtomicUsize::new(0);
        pool.run(self.pieces.len(), &|| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(is_k, from, len, to)) = self.pieces.get(i) else {
                break;
            };
            let src = if is_k { k } else { v };
            // SAFETY: pieces are disjoint ranges of `dst`, which is `total` bytes long.
            unsafe { dst.copy(&src[from..from + len], to) };
        });
    }
}

struct DstPtr(*mut u8);

// SAFETY: threads write disjoint pieces.
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// # Safety
    /// `to + src.len()` is inside the buffer and no other thread writes that range.
    unsafe fn copy(&self, src: &[u8], to: usize) {
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(to), src.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn_core::{decode_bytes, DType, KvCache};

    #[test]
    fn the_copy_peer_moves_the_bytes_the_step_reads() {
        for (cache, window) in [
            (
                KvCache::contiguous(3, 100, vec![40, 0, 99]).seqlen_new(1),
                -1,
            ),
            (
                KvCache::paged(60, 3, (0..60).rev().collect(), 20, vec![50, 7, 13]),
                9,
            ),
        ] {
            let spec = AttentionSpec::new(3, 4, 2, 1, 24)
                .heads_kv(2)
                .head_dim_v(8)
                .dtype(DType::Bf16)
                .window(window, -1)
                .kv_cache(cache);
            spec.validate().unwrap();
            let (_, k, v) = random_inputs(&spec, 1);
            let plan = CopyPlan::new(&spec, &k, &v);
            assert_eq!(plan.bytes() as u64, decode_bytes(&spec));
            plan.run(&ThreadPool::new(2), &k, &v);
            // The first piece arrived.
            let (is_k, from, len, to) = plan.pieces[0];
            let src = if is_k { &k } else { &v };
            let dst = plan.dst.lock().unwrap();
            assert_eq!(
                &dst[to..to + len],
                &src.as_ref().as_bytes()[from..from + len]
            );
        }
    }
}
