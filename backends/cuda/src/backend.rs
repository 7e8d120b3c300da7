//! `CudaBackend`: picks a kernel for a spec, moves data, launches, times.

use crate::compile::BACKEND;
use crate::device::{DevBuf, DeviceInfo, Gpu, Timer};
use crate::loader::load_nvrtc;
use crate::params::{max_seqlen_q, KernelParams};
use crate::tensor_map::TensorMapParams;
use crate::tiles::{
    check_tiles, head_major_order, hopper_tiles, persistent_grid, HOPPER_SMEM_LIMIT, HOPPER_THREADS,
};
use crate::variants::{KernelKind, Variant};
use cudarc::driver::sys;
use flashattn_core::{
    random_inputs, validate_inputs, Algorithm, AttentionSpec, Backend, BenchMeasure, BenchPlan,
    DType, Error, Output, Result, Tensor, TensorRef,
};
use std::ffi::c_void;

/// Rows per block of the generic kernel (kernels/generic_fwd.cu: G_BLOCK_M) and keys per block.
const GENERIC_BLOCK_M: usize = 16;
const GENERIC_BLOCK_N: usize = 32;

/// Shared memory of the generic kernel: Q rows, a padded K block, a V block, all f32.
pub fn generic_smem_bytes(head_dim: usize, head_dim_v: usize) -> usize {
    4 * (GENERIC_BLOCK_M * head_dim
        + GENERIC_BLOCK_N * (head_dim + 1)
        + GENERIC_BLOCK_N * head_dim_v)
}

/// The CUDA backend on device 0.
pub struct CudaBackend {
    gpu: Gpu,
    forced: Option<KernelKind>,
    /// Keys per block and ring depth of the Hopper kernel when not its defaults (tuning).
    block_n: Option<usize>,
    stages: Option<usize>,
}

fn unsupported(reason: impl Into<String>) -> Error {
    Error::Unsupported {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// Which kernel `FLASHATTN_CUDA_KERNEL` forces: "hopper", "generic", or none (automatic).
fn forced_kernel() -> Option<KernelKind> {
    match std::env::var("FLASHATTN_CUDA_KERNEL")
        .ok()?
        .to_ascii_lowercase()
        .as_str()
    {
        "hopper" => Some(KernelKind::Hopper),
        "generic" => Some(KernelKind::Generic),
        _ => None,
    }
}

/// A tensor on the device: allocated by us (freed on drop) or owned by the caller.
enum DevTensor {
    Ours(DevBuf),
    Callers(sys::CUdeviceptr),
}

impl DevTensor {
    fn ptr(&self) -> sys::CUdeviceptr {
        match self {
            DevTensor::Ours(b) => b.ptr,
            DevTensor::Callers(p) => *p,
        }
    }

    /// Copies our allocation back to the host (the caller's tensors are never read back).
    fn to_vec(&self) -> Result<Vec<u8>> {
        match self {
            DevTensor::Ours(b) => b.to_vec(),
            DevTensor::Callers(_) => Err(Error::backend("cuda", "caller-owned tensor read back")),
        }
    }
}

/// Device pointers (`CUdeviceptr`) of tensors the caller owns, in the spec's layouts: q, k, v in
/// the spec's dtype, out in `spec.dtype.output()`, lse f32 (present iff `spec.return_lse`).
/// They must live in the primary context of device 0, the one the CUDA runtime (and so PyTorch)
/// and cudarc use by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTensors {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: Option<u64>,
}

/// Device buffers of one problem.
struct Buffers {
    q: DevTensor,
    k: DevTensor,
    v: DevTensor,
    out: DevTensor,
    lse: Option<DevTensor>,
    /// cu_seqlens and ALiBi slopes: allocations beyond inputs and outputs.
    cu_q: Option<DevBuf>,
    cu_k: Option<DevBuf>,
    alibi: Option<DevBuf>,
}

impl Buffers {
    /// Uploads host inputs into fresh allocations, with a zeroed output and an LSE preset to
    /// -inf (rows of no sequence keep those values).
    fn new(spec: &AttentionSpec, q: &[u8], k: &[u8], v: &[u8]) -> Result<Buffers> {
        let out_bytes = spec.out_elems().unwrap_or(0) * spec.dtype.output().size_bytes();
        let lse = if spec.return_lse {
            let init = vec![f32::NEG_INFINITY; spec.lse_elems().unwrap_or(0)];
            Some(DevTensor::Ours(DevBuf::from_bytes(bytemuck::cast_slice(
                &init,
            ))?))
        } else {
            None
        };
        let ours = |b: DevBuf| DevTensor::Ours(b);
        Buffers::with_tensors(
            spec,
            ours(DevBuf::from_bytes(q)?),
            ours(DevBuf::from_bytes(k)?),
            ours(DevBuf::from_bytes(v)?),
            ours(DevBuf::zeroed(out_bytes)?),
            lse,
        )
    }

    /// Wraps the caller's tensors; only the small side tables are allocated.
    fn callers(spec: &AttentionSpec, t: &DeviceTensors) -> Result<Buffers> {
        Buffers::with_tensors(
            spec,
            DevTensor::Callers(t.q),
            DevTensor::Callers(t.k),
            DevTensor::Callers(t.v),
            DevTensor::Callers(t.out),
            t.lse.map(DevTensor::Callers),
        )
    }

    fn with_tensors(
        spec: &AttentionSpec,
        q: DevTensor,
        k: DevTensor,
        v: DevTensor,
        out: DevTensor,
        lse: Option<DevTensor>,
    ) -> Result<Buffers> {
        let (cu_q, cu_k) = match &spec.varlen {
            Some(vl) => (
                Some(DevBuf::from_bytes(bytemuck::cast_slice(&vl.cu_seqlens_q))?),
                Some(DevBuf::from_bytes(bytemuck::cast_slice(&vl.cu_seqlens_k))?),
            ),
            None => (None, None),
        };
        let alibi = match &spec.alibi {
            Some(a) => Some(DevBuf::from_bytes(bytemuck::cast_slice(&a.slopes))?),
            None => None,
        };
        Ok(Buffers {
            q,
            k,
            v,
            out,
            lse,
            cu_q,
            cu_k,
            alibi,
        })
    }

    fn extra_bytes(&self) -> u64 {
        [&self.cu_q, &self.cu_k, &self.alibi]
            .iter()
            .filter_map(|b| b.as_ref())
            .map(|b| b.bytes as u64)
            .sum()
    }

    fn params(&self, spec: &AttentionSpec, block_m: usize) -> Result<KernelParams> {
        let mut p = KernelParams::from_spec(spec, block_m)?;
        p.q = self.q.ptr();
        p.k = self.k.ptr();
        p.v = self.v.ptr();
        p.out = self.out.ptr();
        p.lse = self.lse.as_ref().map_or(0, |b| b.ptr());
        p.cu_seqlens_q = self.cu_q.as_ref().map_or(0, |b| b.ptr);
        p.cu_seqlens_k = self.cu_k.as_ref().map_or(0, |b| b.ptr);
        p.alibi = self.alibi.as_ref().map_or(0, |b| b.ptr);
        Ok(p)
    }
}

fn arg<T>(x: &mut T) -> *mut c_void {
    (x as *mut T).cast()
}

impl CudaBackend {
    /// Opens device 0. `Error::Unavailable` says what is missing: the driver, a device, NVRTC.
    pub fn new() -> Result<CudaBackend> {
        let gpu = Gpu::open()?;
        load_nvrtc().map_err(|reason| Error::Unavailable {
            backend: BACKEND,
            reason,
        })?;
        let env = |name| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Ok(CudaBackend {
            gpu,
            forced: forced_kernel(),
            block_n: env("FLASHATTN_CUDA_BLOCK_N"),
            stages: env("FLASHATTN_CUDA_STAGES"),
        })
    }

    /// Sets the Hopper kernel's keys per block (`None`: the default of `hopper_tiles`);
    /// starts from `FLASHATTN_CUDA_BLOCK_N`. Checked when a spec is run.
    pub fn set_block_n(&mut self, block_n: Option<usize>) {
        self.block_n = block_n;
    }

    /// Sets the Hopper kernel's K/V ring depth (`None`: default); starts from
    /// `FLASHATTN_CUDA_STAGES`. Checked when a spec is run.
    pub fn set_stages(&mut self, stages: Option<usize>) {
        self.stages = stages;
    }

    /// Forces a kernel family (`None`: automatic, the fastest that supports the spec).
    /// Starts from `FLASHATTN_CUDA_KERNEL=hopper|generic`.
    pub fn force_kernel(&mut self, kind: Option<KernelKind>) {
        self.forced = kind;
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.gpu.info
    }

    /// The kernel variant that runs `spec` here, or why none does.
    pub fn variant_for(&self, spec: &AttentionSpec) -> Result<Variant> {
        spec.validate()?;
        if spec.dtype == DType::Fp8E4m3 {
            return Err(unsupported(
                "fp8e4m3 is not implemented in the CUDA backend yet",
            ));
        }
        let hopper_ok = || -> std::result::Result<(), String> {
            if self.gpu.info.arch() != "sm_90a" {
                return Err(format!(
                    "the Hopper kernel needs sm_90a, this GPU is {}",
                    self.gpu.info.arch()
                ));
            }
            if !matches!(spec.dtype, DType::Bf16 | DType::F16) {
                return Err(format!(
                    "the Hopper kernel takes bf16 or f16, not {}",
                    spec.dtype
                ));
            }
            if spec.head_dim != spec.head_dim_v || hopper_tiles(spec.head_dim).is_none() {
                return Err(format!(
                    "the Hopper kernel takes head_dim = head_dim_v in 64, 128, 256, not {}/{}",
                    spec.head_dim, spec.head_dim_v
                ));
            }
            Ok(())
        };
        let generic = || -> Result<Variant> {
            let smem = generic_smem_bytes(spec.head_dim, spec.head_dim_v);
            if smem > self.gpu.info.smem_optin {
                return Err(unsupported(format!(
                    "head_dim {} / head_dim_v {} needs {smem} bytes of shared memory, this GPU allows {}",
                    spec.head_dim, spec.head_dim_v, self.gpu.info.smem_optin
                )));
            }
            Ok(Variant::generic(spec.dtype))
        };
        match (self.forced, hopper_ok()) {
            (Some(KernelKind::Generic), _) => generic(),
            (Some(KernelKind::Hopper), Err(why)) => Err(unsupported(why)),
            (_, Ok(())) => {
                let v = Variant::hopper(
                    spec.dtype,
                    spec.head_dim,
                    spec.softcap > 0.0 || spec.alibi.is_some(),
                );
                if self.block_n.is_none() && self.stages.is_none() {
                    return Ok(v);
                }
                let t =
                    check_tiles(spec.head_dim, self.block_n, self.stages).map_err(unsupported)?;
                let v = if self.block_n.is_some() {
                    v.with_block_n(t.block_n)
                } else {
                    v
                };
                Ok(if self.stages.is_some() {
                    v.with_stages(t.stages)
                } else {
                    v
                })
            }
            (_, Err(_)) => generic(),
        }
    }

    /// The forward pass on tensors already on the GPU (no host round trip); returns when the
    /// kernel has finished. Tokens of no varlen sequence are left as the caller had them.
    ///
    /// # Safety
    /// Each pointer must address at least its tensor's bytes for `spec` (see [`DeviceTensors`])
    /// in device 0's primary context and stay valid for the call; `out` and `lse` must not
    /// overlap the inputs or each other.
    pub unsafe fn forward_device(
        &self,
        spec: &AttentionSpec,
        tensors: &DeviceTensors,
    ) -> Result<()> {
        spec.validate()?;
        let variant = self.variant_for(spec)?;
        if spec.return_lse != tensors.lse.is_some() {
            return Err(Error::invalid(
                "lse",
                if tensors.lse.is_some() {
                    "given"
                } else {
                    "missing"
                },
                format!(
                    "an lse pointer is needed exactly when return_lse is set ({})",
                    spec.return_lse
                ),
            ));
        }
        let named = [
            ("q", tensors.q),
            ("k", tensors.k),
            ("v", tensors.v),
            ("out", tensors.out),
        ];
        for (name, ptr) in named.into_iter().chain(tensors.lse.map(|p| ("lse", p))) {
            // TMA reads need 16-byte aligned global addresses; null is never valid.
            if ptr == 0 || ptr % 16 != 0 {
                return Err(Error::invalid(
                    name,
                    format!("{ptr:#x}"),
                    "device pointers must be non-null and 16-byte aligned",
                ));
            }
        }
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::callers(spec, tensors)?;
        self.launch_flash(spec, &variant, &bufs)?;
        self.gpu.synchronize()
    }

    /// Queues the flash kernel for `spec` on the default stream (no synchronisation).
    fn launch_flash(&self, spec: &AttentionSpec, variant: &Variant, bufs: &Buffers) -> Result<()> {
        let max_q = max_seqlen_q(spec);
        if max_q == 0 {
            return Ok(());
        }
        match variant.kind {
            KernelKind::Hopper => {
                let tiles = variant
                    .tiles()
                    .ok_or_else(|| unsupported("no Hopper tiles"))?;
                let mut p = bufs.params(spec, tiles.block_m)?;
                p.head_major_tiles = head_major_order(spec.causal, spec.head_dim) as i32;
                let bf16 = spec.dtype == DType::Bf16;
                let q_tokens = spec.q_tokens().unwrap_or(0);
                let k_tokens = spec.k_tokens().unwrap_or(0);
                let mut tq =
                    TensorMapParams::new(q_tokens, spec.heads_q, spec.head_dim, tiles.block_m)?
                        .encode(bufs.q.ptr(), bf16)?;
                let mut tk =
                    TensorMapParams::new(k_tokens, spec.heads_kv, spec.head_dim, tiles.block_n)?
                        .encode(bufs.k.ptr(), bf16)?;
                let mut tv =
                    TensorMapParams::new(k_tokens, spec.heads_kv, spec.head_dim_v, tiles.block_n)?
                        .encode(bufs.v.ptr(), bf16)?;
                let smem = tiles.smem_bytes(spec.head_dim);
                if smem > self.gpu.info.smem_optin.min(HOPPER_SMEM_LIMIT) {
                    return Err(unsupported(format!(
                        "the Hopper kernel needs {smem} bytes of shared memory"
                    )));
                }
                let f = self.gpu.function(variant, 0, smem)?;
                let grid = persistent_grid(p.total_tiles as usize, self.gpu.info.sm_count) as u32;
                self.gpu.launch(
                    f,
                    (grid, 1, 1),
                    HOPPER_THREADS,
                    smem,
                    &mut [arg(&mut tq), arg(&mut tk), arg(&mut tv), arg(&mut p)],
                )
            }
            KernelKind::Generic => {
                let mut p = bufs.params(spec, GENERIC_BLOCK_M)?;
                let smem = generic_smem_bytes(spec.head_dim, spec.head_dim_v);
                let f = self.gpu.function(variant, 0, smem)?;
                let grid = (
                    p.num_m_blocks as u32,
                    spec.heads_q as u32,
                    spec.batch as u32,
                );
                if grid.1 > 65535 || grid.2 > 65535 {
                    return Err(unsupported("heads_q and batch must be at most 65535"));
                }
                self.gpu.launch(f, grid, 128, smem, &mut [arg(&mut p)])
            }
            KernelKind::Naive => Err(unsupported("the naive kernel is not a flash kernel")),
        }
    }

    /// Queues naive attention (materialised scores in `scores`).
    fn launch_naive(&self, spec: &AttentionSpec, bufs: &Buffers, scores: &DevBuf) -> Result<()> {
        let variant = Variant::naive(spec.dtype);
        let mut p = bufs.params(spec, 1)?;
        let mut s = scores.ptr;
        let bh = (spec.batch * spec.heads_q) as u32;
        let f = self.gpu.function(&variant, 0, 0)?;
        let grid = (spec.seqlen_k.div_ceil(128) as u32, spec.seqlen_q as u32, bh);
        self.gpu
            .launch(f, grid, 128, 0, &mut [arg(&mut p), arg(&mut s)])?;
        let f = self.gpu.function(&variant, 1, 0)?;
        self.gpu.launch(
            f,
            (spec.seqlen_q.div_ceil(4) as u32, bh, 1),
            128,
            0,
            &mut [arg(&mut p), arg(&mut s)],
        )
    }

    fn naive_scores_bytes(spec: &AttentionSpec) -> Result<usize> {
        if spec.is_varlen() {
            return Err(unsupported(
                "naive attention benchmarks take dense batches only",
            ));
        }
        if spec.seqlen_q > 65535 || spec.batch * spec.heads_q > 65535 {
            return Err(unsupported(
                "naive attention: seqlen_q and batch x heads_q must be at most 65535",
            ));
        }
        spec.batch
            .checked_mul(spec.heads_q)
            .and_then(|x| x.checked_mul(spec.seqlen_q))
            .and_then(|x| x.checked_mul(spec.seqlen_k))
            .and_then(|x| x.checked_mul(4))
            .ok_or_else(|| unsupported("naive attention: the score matrix size overflows"))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn device(&self) -> String {
        self.gpu.info.describe()
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.variant_for(spec).map(|_| ())
    }

    fn forward(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        validate_inputs(spec, &q, &k, &v)?;
        let variant = self.variant_for(spec)?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::new(spec, q.as_bytes(), k.as_bytes(), v.as_bytes())?;
        self.launch_flash(spec, &variant, &bufs)?;
        self.gpu.synchronize()?;
        let out = Tensor::from_bytes(spec.dtype.output(), &bufs.out.to_vec()?);
        let lse = match &bufs.lse {
            Some(b) => Some(bytemuck::pod_collect_to_vec(&b.to_vec()?)),
            None => None,
        };
        Ok(Output { out: out?, lse })
    }

    fn bench(
        &self,
        spec: &AttentionSpec,
        algo: Algorithm,
        plan: &BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<BenchMeasure> {
        spec.validate()?;
        let variant = self.variant_for(spec)?;
        let scores_bytes = match algo {
            Algorithm::Naive => Some(Self::naive_scores_bytes(spec)?),
            Algorithm::Flash => None,
            Algorithm::Copy => return Err(unsupported("the copy peer is not implemented yet")),
        };
        let (q, k, v) = random_inputs(spec, plan.seed);
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::new(
            spec,
            q.as_ref().as_bytes(),
            k.as_ref().as_bytes(),
            v.as_ref().as_bytes(),
        )?;
        let scores = match scores_bytes {
            Some(n) => Some(DevBuf::alloc(n)?),
            None => None,
        };
        let run = |this: &Self| match &scores {
            Some(s) => this.launch_naive(spec, &bufs, s),
            None => this.launch_flash(spec, &variant, &bufs),
        };
        for _ in 0..plan.warmup {
            run(self)?;
            self.gpu.synchronize()?;
            progress();
        }
        let timer = Timer::new()?;
        let mut times_ms = Vec::with_capacity(plan.iters);
        for _ in 0..plan.iters {
            timer.start()?;
            run(self)?;
            times_ms.push(timer.stop_ms()?);
            progress();
        }
        self.gpu.synchronize()?;
        let extra = bufs.extra_bytes() + scores.as_ref().map_or(0, |s| s.bytes as u64);
        Ok(BenchMeasure {
            times_ms,
            extra_bytes: Some(extra),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_smem_matches_the_kernel_layout() {
        // sq [16][d] + sk [32][d+1] + sv [32][dv], f32.
        assert_eq!(
            generic_smem_bytes(64, 64),
            4 * (16 * 64 + 32 * 65 + 32 * 64)
        );
        // The largest shapes fit a 96 KiB opt-in (V100) and below.
        assert!(generic_smem_bytes(256, 256) <= 96 * 1024);
    }
}
