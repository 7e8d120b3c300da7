//! The backward pass (FlashAttention-2's algorithm, DESIGN.md "Backward"): which backward
//! kernel family runs a spec, the launches of one call, its device buffers, and the host and
//! device-resident entry points.
//!
//! A backward family is one [`KernelKind`] (variants.rs) whose module has the four entry points
//! of [`Stage`], in that order: pre-processing (delta = rowsum(dout * out); the f32 dq
//! accumulator zeroed), post-processing (dq = scale * accumulator, in the input dtype), the
//! main kernel over key blocks (dk, dv; dq by f32 atomics) and the deterministic dq kernel.
//! A family plugs in with its `select_*` function in [`CudaBackend::choose_backward`] (first
//! that runs the spec wins) and its `Tiles` arm in [`backward_plan`]. Today:
//! * `mma_bwd` (kernels/mma_bwd.cu): mma.sync, sm_80+, f16/bf16, head dims up to 256;
//! * `generic_bwd` (kernels/generic_bwd.cu): CUDA cores, sm_70+, f32 (and any dtype).
//!
//! dq: by default the main kernel adds each key block's dQ into an f32 accumulator with
//! atomicAdd (FlashAttention-2's default: the order of the additions varies from run to run).
//! With `spec.deterministic` the main kernel leaves dq alone and the dq kernel sums each query
//! block's dQ over its key blocks in order (recomputing S and dP: 7 block products instead of
//! 5): every run gives the same bits. dk and dv are always summed in a fixed order (GQA: over
//! the query heads of a KV head, in order, inside one CTA).

mod bench;
pub mod tiles;

use crate::compile::BACKEND;
use crate::device::{check_device_pointers, DevBuf};
use crate::forward::{arg, Buffers, DevTensor};
use crate::params::KernelParams;
use crate::tables::DeviceTables;
use crate::tiles::Launch;
use crate::variants::{KernelKind, Tiles, Variant};
use crate::CudaBackend;
use flashattn_core::{
    validate_backward_inputs, AttentionSpec, BackwardInputs, CheckedSpec, DType, Error, Grads,
    Result, Tensor,
};
use tiles::{
    mma_bwd_head_dim, mma_bwd_tiles, per_head_launch, post_launch, prep_launch, BwdShape, PerHead,
};

fn unsupported(reason: impl Into<String>) -> Error {
    Error::unsupported(BACKEND, reason)
}

/// One launch of a backward pass; its value is the entry point's index in every backward
/// family's `KernelDef::entry_points`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// `fa_bwd_prep(params, dout, delta, dq_accum)`
    Prep = 0,
    /// `fa_bwd_post(params, dq_accum, dq)`
    Post = 1,
    /// `fa_*_bwd(params, dout, delta, dq_accum, dk, dv)`; dq_accum null when deterministic.
    Main = 2,
    /// `fa_*_bwd_dq(params, dout, delta, dq)`, deterministic only.
    Dq = 3,
}

/// Everything one backward call launches, computed on the host without a GPU (the emulator
/// tests run the same plan).
#[derive(Clone, Debug)]
pub struct BackwardPlan {
    /// The kernels' parameters, pointers left 0 (out and lse are inputs here).
    pub params: KernelParams,
    /// In launch order; stages with an empty grid (no queries, no keys) are left out.
    pub launches: Vec<(Stage, Launch)>,
    /// f32 elements of the dq accumulator; 0 when deterministic (no accumulator).
    pub dq_accum: usize,
}

/// The launch plan of backward `variant` for `spec`.
pub fn backward_plan(spec: &CheckedSpec<'_>, variant: &Variant) -> Result<BackwardPlan> {
    let shape = BwdShape {
        batch: spec.batch,
        heads_q: spec.heads_q,
        heads_kv: spec.heads_kv,
        q_tokens: spec.sizes.q_tokens,
        head_dim: spec.head_dim,
        max_q_len: spec.sizes.max_q_len,
        max_k_len: spec.sizes.max_k_len,
    };
    let (main, dq) = match variant.tiles {
        Tiles::MmaBwd(t) => (
            per_head_launch(
                &shape,
                PerHead::Keys,
                t.block_n,
                t.threads(),
                t.smem_bytes(variant.head_dim),
            ),
            per_head_launch(
                &shape,
                PerHead::Queries,
                t.dq_block_m(),
                t.threads(),
                t.dq_smem_bytes(variant.head_dim),
            ),
        ),
        Tiles::GenericBwd(t) => {
            let threads = (t.warps * 32) as u32;
            (
                per_head_launch(&shape, PerHead::Keys, t.warps * t.keys_per_warp, threads, 0),
                per_head_launch(&shape, PerHead::Queries, t.warps, threads, 0),
            )
        }
        _ => {
            return Err(unsupported(format!(
                "{} is not a backward kernel",
                variant.name()
            )))
        }
    };
    let deterministic = spec.deterministic;
    let stages = [
        (Stage::Prep, prep_launch(&shape)),
        (Stage::Main, main),
        if deterministic {
            (Stage::Dq, dq)
        } else {
            (Stage::Post, post_launch(&shape))
        },
    ];
    let mut launches = Vec::new();
    for (stage, l) in stages {
        if let Some(l) = l.map_err(unsupported)? {
            launches.push((stage, l));
        }
    }
    Ok(BackwardPlan {
        // The query block size only sizes num_m_blocks / total_tiles, which the backward
        // kernels do not read (their grids say it).
        params: KernelParams::new(spec, 64)?,
        launches,
        dq_accum: if deterministic { 0 } else { spec.sizes.q },
    })
}

/// The mma.sync backward for `spec` on a GPU of `compute_capability` whose blocks may use
/// `smem_optin` bytes of shared memory, or why not.
pub fn select_mma_bwd(
    spec: &CheckedSpec<'_>,
    compute_capability: (i32, i32),
    smem_optin: usize,
) -> std::result::Result<Variant, String> {
    let (major, minor) = compute_capability;
    if major < 8 {
        return Err(format!(
            "the mma.sync backward needs sm_80 or newer, this GPU is sm_{major}{minor}"
        ));
    }
    if !matches!(spec.dtype, DType::Bf16 | DType::F16) {
        return Err(format!(
            "the mma.sync backward takes bf16 or f16, not {} (f32 runs the portable backward)",
            spec.dtype
        ));
    }
    let bucket = mma_bwd_head_dim(spec.head_dim, spec.head_dim_v).ok_or_else(|| {
        format!(
            "the mma.sync backward takes head dims up to 256, not {}/{}",
            spec.head_dim, spec.head_dim_v
        )
    })?;
    Ok(Variant::mma_bwd(
        spec.dtype,
        bucket,
        mma_bwd_tiles(bucket, smem_optin)?,
    ))
}

/// The portable backward: any dtype the backward takes, any shape, no shared memory.
pub fn select_generic_bwd(spec: &CheckedSpec<'_>) -> std::result::Result<Variant, String> {
    Ok(Variant::generic_bwd(spec.dtype))
}

/// The backward family a forced forward family implies (`FLASHATTN_CUDA_KERNEL`); `None` (the
/// automatic choice) for Hopper, which has no backward kernel yet.
fn backward_family(forced: KernelKind) -> Option<KernelKind> {
    match forced {
        KernelKind::Mma | KernelKind::MmaBwd => Some(KernelKind::MmaBwd),
        KernelKind::Generic | KernelKind::GenericBwd => Some(KernelKind::GenericBwd),
        _ => None,
    }
}

/// Device pointers (`CUdeviceptr`) of a backward call's tensors, which the caller owns, in the
/// spec's layouts: q, k, v, out, dout, dq, dk, dv in the spec's dtype; lse f32 (the forward's).
/// They must live in the primary context of the backend's device, like [`crate::DeviceTensors`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardTensors {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub dout: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
}

/// Device buffers of one backward call: the forward's (q, k, v, out, lse, side tables), dout,
/// the gradients, and the workspace (delta, the f32 dq accumulator).
pub(crate) struct BwdBuffers {
    fwd: Buffers,
    dout: DevTensor,
    dq: DevTensor,
    dk: DevTensor,
    dv: DevTensor,
    delta: DevBuf,
    dq_accum: Option<DevBuf>,
}

impl BwdBuffers {
    fn new(
        spec: &CheckedSpec<'_>,
        plan: &BackwardPlan,
        fwd: Buffers,
        [dout, dq, dk, dv]: [DevTensor; 4],
    ) -> Result<BwdBuffers> {
        let dq_accum = match plan.dq_accum {
            0 => None,
            n => Some(DevBuf::alloc(n * 4)?),
        };
        Ok(BwdBuffers {
            fwd,
            dout,
            dq,
            dk,
            dv,
            delta: DevBuf::alloc(spec.sizes.lse * 4)?,
            dq_accum,
        })
    }

    /// Allocations beyond inputs and gradients: side tables, delta, the dq accumulator.
    pub(crate) fn extra_bytes(&self) -> u64 {
        let accum = self.dq_accum.as_ref().map_or(0, |b| b.bytes as u64);
        self.fwd.extra_bytes() + self.delta.bytes as u64 + accum
    }
}

impl CudaBackend {
    /// The backward kernel variant that runs `spec` here, or why none does.
    pub fn backward_variant_for(&self, spec: &AttentionSpec) -> Result<Variant> {
        self.choose_backward(&spec.validate()?)
    }

    /// The forced family's backward (see [`backward_family`]); else the first of the mma.sync
    /// and the portable backward that runs `spec` on this GPU.
    pub(crate) fn choose_backward(&self, spec: &CheckedSpec<'_>) -> Result<Variant> {
        if spec.dtype == DType::Fp8E4m3 {
            return Err(Error::invalid(
                "dtype",
                spec.dtype,
                "the backward pass takes f32, f16 or bf16",
            ));
        }
        if let Some(kind) = self.forced.and_then(backward_family) {
            return self.try_backward(spec, kind).map_err(unsupported);
        }
        let mut why = Vec::new();
        for kind in [KernelKind::MmaBwd, KernelKind::GenericBwd] {
            match self.try_backward(spec, kind) {
                Ok(v) => return Ok(v),
                Err(e) => why.push(e),
            }
        }
        Err(unsupported(why.join("; ")))
    }

    fn try_backward(
        &self,
        spec: &CheckedSpec<'_>,
        kind: KernelKind,
    ) -> std::result::Result<Variant, String> {
        let info = &self.gpu.info;
        match kind {
            KernelKind::MmaBwd => select_mma_bwd(spec, info.compute_capability, info.smem_optin),
            KernelKind::GenericBwd => select_generic_bwd(spec),
            other => Err(format!("{} is not a backward kernel", other.def().name)),
        }
    }

    /// `cuda/backward/<variant>`, `_det` appended when deterministic (other kernels run).
    pub(crate) fn backward_kernel_name(&self, spec: &AttentionSpec) -> Result<String> {
        let v = self.backward_variant_for(spec)?;
        Ok(match spec.deterministic {
            true => format!("{}_det", v.name()),
            false => v.name(),
        })
    }

    /// Queues the launches of `plan` on the backend's stream (no synchronisation).
    pub(crate) fn launch_backward(
        &self,
        spec: &CheckedSpec<'_>,
        variant: &Variant,
        plan: &BackwardPlan,
        bufs: &BwdBuffers,
    ) -> Result<()> {
        let mut p = plan.params;
        bufs.fwd.set_pointers(&mut p);
        let (mut dout, mut dq, mut dk, mut dv) =
            (bufs.dout.ptr(), bufs.dq.ptr(), bufs.dk.ptr(), bufs.dv.ptr());
        let mut delta = bufs.delta.ptr;
        let mut accum = bufs.dq_accum.as_ref().map_or(0, |b| b.ptr);
        debug_assert_eq!(accum == 0, spec.deterministic);
        for &(stage, l) in &plan.launches {
            let mut args = match stage {
                Stage::Prep => vec![
                    arg(&mut p),
                    arg(&mut dout),
                    arg(&mut delta),
                    arg(&mut accum),
                ],
                Stage::Post => vec![arg(&mut p), arg(&mut accum), arg(&mut dq)],
                Stage::Main => vec![
                    arg(&mut p),
                    arg(&mut dout),
                    arg(&mut delta),
                    arg(&mut accum),
                    arg(&mut dk),
                    arg(&mut dv),
                ],
                Stage::Dq => vec![arg(&mut p), arg(&mut dout), arg(&mut delta), arg(&mut dq)],
            };
            if l.smem > self.gpu.info.smem_optin {
                return Err(unsupported(format!(
                    "kernel {} needs {} bytes of shared memory, this GPU allows {}",
                    variant.name(),
                    l.smem,
                    self.gpu.info.smem_optin
                )));
            }
            let f = self.gpu.function(variant, stage as usize, l.smem)?;
            self.gpu.launch(f, l.grid, l.block, l.smem, &mut args)?;
        }
        Ok(())
    }

    /// The backward pass on host data (`Backend::backward`).
    pub(crate) fn backward_host(
        &self,
        spec: &AttentionSpec,
        inputs: BackwardInputs<'_>,
    ) -> Result<Grads> {
        let checked = validate_backward_inputs(spec, &inputs)?;
        let variant = self.choose_backward(&checked)?;
        let plan = backward_plan(&checked, &variant)?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let up = |b: &[u8]| DevBuf::from_bytes(b).map(DevTensor::Ours);
        let zeroed = |n: usize| DevBuf::zeroed(n * spec.dtype.size_bytes()).map(DevTensor::Ours);
        let fwd = Buffers::with_tensors(
            &checked,
            up(inputs.q.as_bytes())?,
            up(inputs.k.as_bytes())?,
            up(inputs.v.as_bytes())?,
            up(inputs.out.as_bytes())?,
            Some(up(bytemuck::cast_slice(inputs.lse))?),
            &DeviceTables::default(),
        )?;
        let sizes = &checked.sizes;
        let grads = [
            up(inputs.dout.as_bytes())?,
            zeroed(sizes.q)?,
            zeroed(sizes.k)?,
            zeroed(sizes.v)?,
        ];
        let bufs = BwdBuffers::new(&checked, &plan, fwd, grads)?;
        self.launch_backward(&checked, &variant, &plan, &bufs)?;
        self.gpu.synchronize()?;
        let grad = |t: &DevTensor| Tensor::from_bytes(spec.dtype, &t.to_vec()?);
        Ok(Grads {
            dq: grad(&bufs.dq)?,
            dk: grad(&bufs.dk)?,
            dv: grad(&bufs.dv)?,
        })
    }

    /// The backward pass on tensors already on the GPU; returns when the kernels have
    /// finished. Allocates only the workspace (delta, and the f32 dq accumulator unless
    /// `spec.deterministic`). Every element of dq, dk, dv of a sequence token is written
    /// (rows that see no key, keys no row sees: 0).
    ///
    /// # Safety
    /// Each pointer must address at least its tensor's bytes for `spec` (see
    /// [`BackwardTensors`]) in the backend's device's primary context and stay valid for the call; dq, dk
    /// and dv must not overlap each other or the inputs.
    pub unsafe fn backward_device(
        &self,
        spec: &AttentionSpec,
        tensors: &BackwardTensors,
    ) -> Result<()> {
        self.backward_device_with_tables(spec, tensors, &DeviceTables::default())
    }

    /// [`backward_device`](Self::backward_device) reading the side tables in `tables` where
    /// the caller holds them (no upload of those). It still waits for its kernels: its
    /// workspace (delta, the dq accumulator) is allocated per call.
    ///
    /// # Safety
    /// As for `backward_device`; each table holds `len` elements of its type with the values
    /// the spec bounds (see `DeviceTables`).
    pub unsafe fn backward_device_with_tables(
        &self,
        spec: &AttentionSpec,
        tensors: &BackwardTensors,
        tables: &DeviceTables,
    ) -> Result<()> {
        let checked = spec.validate()?;
        tables.check(spec)?;
        let variant = self.choose_backward(&checked)?;
        let plan = backward_plan(&checked, &variant)?;
        let t = tensors;
        let named = [
            ("q", t.q),
            ("k", t.k),
            ("v", t.v),
            ("out", t.out),
            ("lse", t.lse),
            ("dout", t.dout),
            ("dq", t.dq),
            ("dk", t.dk),
            ("dv", t.dv),
        ];
        check_device_pointers(named)?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let c = DevTensor::Callers;
        let (q, k, v, out, lse) = (c(t.q), c(t.k), c(t.v), c(t.out), Some(c(t.lse)));
        let fwd = Buffers::with_tensors(&checked, q, k, v, out, lse, tables)?;
        let bufs = BwdBuffers::new(&checked, &plan, fwd, [c(t.dout), c(t.dq), c(t.dk), c(t.dv)])?;
        self.launch_backward(&checked, &variant, &plan, &bufs)?;
        self.gpu.synchronize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(spec: &AttentionSpec, smem: usize) -> (Variant, BackwardPlan) {
        let c = spec.validate().unwrap();
        let v = select_mma_bwd(&c, (8, 0), smem)
            .or_else(|_| select_generic_bwd(&c))
            .unwrap();
        let p = backward_plan(&c, &v).unwrap();
        (v, p)
    }

    #[test]
    fn plans_launch_prep_main_then_post_or_the_dq_kernel() {
        let spec = AttentionSpec::new(2, 8, 300, 500, 72)
            .heads_kv(2)
            .dtype(DType::Bf16);
        let (v, p) = plan(&spec, 166_912);
        assert_eq!(v.kind, KernelKind::MmaBwd);
        assert_eq!(v.head_dim, 128);
        let stages: Vec<Stage> = p.launches.iter().map(|l| l.0).collect();
        assert_eq!(stages, [Stage::Prep, Stage::Main, Stage::Post]);
        assert_eq!(p.dq_accum, 2 * 300 * 8 * 72);
        // Main: 128-key blocks of 500 keys, per kv head and batch entry.
        assert_eq!(p.launches[1].1.grid, (4, 2, 2));
        let (_, p) = plan(&spec.clone().deterministic(true), 166_912);
        let stages: Vec<Stage> = p.launches.iter().map(|l| l.0).collect();
        assert_eq!(stages, [Stage::Prep, Stage::Main, Stage::Dq]);
        assert_eq!(p.dq_accum, 0);
        // The dq kernel: 128 query rows (8 warps) per CTA, per query head.
        assert_eq!(p.launches[2].1.grid, (3, 8, 2));
        // f32 runs the portable backward.
        let (v, p) = plan(&spec.clone().dtype(DType::F32), 166_912);
        assert_eq!(v.kind, KernelKind::GenericBwd);
        assert_eq!(p.launches[1].1.grid, (500usize.div_ceil(8) as u32, 2, 2));
    }

    #[test]
    fn empty_sides_launch_only_what_writes_zeros() {
        // No keys: prep zeroes the dq accumulator, post writes dq = 0; no main kernel.
        let spec = AttentionSpec::new(1, 2, 20, 40, 64)
            .dtype(DType::F16)
            .varlen(vec![0, 20], vec![0, 0]);
        let (_, p) = plan(&spec, 101_376);
        let stages: Vec<Stage> = p.launches.iter().map(|l| l.0).collect();
        assert_eq!(stages, [Stage::Prep, Stage::Post]);
    }

    #[test]
    fn selection_explains_refusals() {
        let c = AttentionSpec::new(1, 1, 8, 8, 64).dtype(DType::F32);
        let e = select_mma_bwd(&c.validate().unwrap(), (8, 0), 166_912).unwrap_err();
        assert!(e.contains("f32 runs the portable backward"), "{e}");
        let c = AttentionSpec::new(1, 1, 8, 8, 64).dtype(DType::Bf16);
        let e = select_mma_bwd(&c.validate().unwrap(), (7, 5), 166_912).unwrap_err();
        assert!(e.contains("sm_75"), "{e}");
        assert_eq!(backward_family(KernelKind::Mma), Some(KernelKind::MmaBwd));
        assert_eq!(backward_family(KernelKind::Hopper), None);
    }
}
