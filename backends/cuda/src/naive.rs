//! Naive attention (kernels/naive.cu): the full score matrix in device memory, as a framework
//! without a fused kernel computes it; the benchmarks' memory and speed peer.

use crate::compile::BACKEND;
use crate::device::DevBuf;
use crate::forward::{arg, Buffers};
use crate::tiles::{grid_x, grid_yz};
use crate::variants::Variant;
use crate::CudaBackend;
use flashattn_core::{CheckedSpec, Error, Result};

/// Bytes of the f32 score matrix naive attention materialises for `spec`, or why it cannot run.
pub(crate) fn scores_bytes(spec: &CheckedSpec<'_>) -> Result<usize> {
    let refuse = |why: &str| Error::unsupported(BACKEND, format!("naive attention: {why}"));
    if !spec.strides.is_contiguous() {
        return Err(refuse("contiguous inputs only"));
    }
    if !spec.is_uniform() {
        return Err(refuse("dense batches only (no varlen, no KV cache)"));
    }
    let bh = spec.batch.saturating_mul(spec.heads_q);
    grid_yz(spec.seqlen_q, "seqlen_q").map_err(|e| refuse(&e))?;
    grid_yz(bh, "batch x heads_q").map_err(|e| refuse(&e))?;
    bh.checked_mul(spec.seqlen_q)
        .and_then(|x| x.checked_mul(spec.seqlen_k))
        .and_then(|x| x.checked_mul(4))
        .ok_or_else(|| refuse("the score matrix size overflows"))
}

impl CudaBackend {
    /// Queues naive attention with its scores in `scores` (`scores_bytes` long).
    pub(crate) fn launch_naive(
        &self,
        spec: &CheckedSpec<'_>,
        bufs: &Buffers,
        scores: &DevBuf,
    ) -> Result<()> {
        let unsupported = |e: String| Error::unsupported(BACKEND, e);
        let variant = Variant::naive(spec.dtype);
        let mut p = bufs.params(spec, 1)?;
        let mut s = scores.ptr;
        let bh = grid_yz(spec.batch * spec.heads_q, "batch x heads_q").map_err(unsupported)?;
        let rows = grid_yz(spec.seqlen_q, "seqlen_q").map_err(unsupported)?;
        let f = self.gpu.function(&variant, 0, 0)?;
        let key_blocks = grid_x(spec.seqlen_k.div_ceil(128), "key blocks").map_err(unsupported)?;
        self.gpu.launch(
            f,
            (key_blocks, rows, bh),
            128,
            0,
            &mut [arg(&mut p), arg(&mut s)],
        )?;
        let f = self.gpu.function(&variant, 1, 0)?;
        let row_blocks = grid_x(spec.seqlen_q.div_ceil(4), "row blocks").map_err(unsupported)?;
        self.gpu.launch(
            f,
            (row_blocks, bh, 1),
            128,
            0,
            &mut [arg(&mut p), arg(&mut s)],
        )
    }
}
