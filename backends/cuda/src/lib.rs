//! flashattn-cuda: flashattn's CUDA backend.
//!
//! * On Hopper (sm_90a), bf16/f16 with head_dim = head_dim_v in 64/128/256 run a
//!   FlashAttention-3-style kernel (kernels/hopper_fwd.cu): TMA loads into an mbarrier-guarded
//!   shared-memory ring, a producer warpgroup and two consumer warpgroups (setmaxnreg), wgmma
//!   for Q K^T and P V, a persistent grid, causal/window block skipping.
//! * FP8 e4m3 (head_dim = head_dim_v 128 or 256, softcap/ALiBi at 128 only, descales per
//!   (batch, KV head), bf16 output)
//!   runs an FP8 build of the same kernel on sm_90a only (fp8.rs): a pre-pass writes V
//!   transposed (wgmma's 8-bit B operand must be K-major), QGMMA for both products, P in e4m3.
//!   Compile- and SASS-checked; not yet run on a GPU (the canary guards its first use).
//! * Other f16/bf16 problems on sm_80 and later (A100, RTX 30/40, L4, L40, H100 outside those
//!   shapes) run a FlashAttention-2-style tensor-core kernel (kernels/mma_fwd.cu): mma.sync,
//!   ldmatrix, cp.async, any head_dim up to 256.
//! * f32, and GPUs before sm_80 (sm_70+), run a portable kernel on CUDA cores
//!   (kernels/generic_fwd.cu).
//! * Kernels are compiled by NVRTC for the device's exact arch at first use and cached on disk
//!   (see [`cache_root`]); nothing links against CUDA at build time: libcuda and NVRTC are
//!   opened at run time (system CUDA, the pip wheel nvidia-cuda-nvrtc, or
//!   `FLASHATTN_CUDA_PATH` / `FLASHATTN_NVRTC_PATH`).
//!
//! `FLASHATTN_CUDA_KERNEL=hopper|hopper_fp8|mma|generic` forces a kernel family (tests use it to check each).

mod backward;
mod bench;
mod cache;
mod compile;
mod decode;
mod decode_bench;
mod decode_device;
mod decode_tables;
mod decode_tiles;
mod decode_workspace;
mod device;
mod families;
mod forward;
mod fp8;
mod kv_cache;
mod loader;
mod naive;
mod params;
mod select;
mod tables;
mod tensor_map;
mod tiles;
mod variants;

pub use backward::tiles::{
    mma_bwd_head_dim, mma_bwd_tiles, GenericBwdTiles, MmaBwdTiles, GENERIC_BWD_TILES,
    MMA_BWD_HEAD_DIMS,
};
pub use backward::{
    backward_plan, select_generic_bwd, select_mma_bwd, BackwardPlan, BackwardTensors, Stage,
};
pub use cache::cache_root;
pub use compile::{
    compile, compile_all, compile_many, compile_source, compile_threads, nvrtc_version,
    options as nvrtc_options, Compiled,
};
pub use decode::{
    decode_plan, decode_plan_from_bounds, select_decode, AppendLaunch, DecodePlan, DecodeTables,
};
pub use decode_device::DeviceDecode;
pub use decode_tables::{decode_bounds, DecodeDeviceTables, DeviceWorkspace};
pub use decode_tiles::{decode_head_dim, decode_tiles, num_splits, DecodeTiles, DECODE_HEAD_DIMS};
pub use decode_workspace::scratch_layout;
pub use device::{probe, DeviceInfo};
pub use forward::{flash_launch, DeviceTensors};
pub use fp8::{Fp8Args, Fp8Tables, KEY_PAD};
pub use kv_cache::CudaKvCache;
pub use loader::{nvrtc_search_dirs, nvrtc_search_dirs_in, SearchEnv};
pub use params::{DecodeParams, KernelParams};
pub use select::{
    forward_candidates, select_forward_kind, select_generic, select_hopper, select_mma,
    ForwardTiles,
};
pub use tables::{varlen_bounds, DeviceTable, DeviceTables};
pub use tiles::{
    hopper_tiles, mma_head_dim, mma_tiles, smem_optin_of_arch, HopperTiles, Launch, MmaTiles,
    GENERIC_TILES, MMA_HEAD_DIMS,
};
pub use variants::{
    all_variants, arch_for, variants_for_arch, KernelDef, KernelKind, Tiles, Variant, CI_ARCHS,
    DECODE_APPEND_ENTRY, DECODE_COMBINE_ENTRY,
};

use bench::BenchCall;
use compile::BACKEND;
use device::Gpu;
use flashattn_core::{
    AttentionSpec, Backend, BackwardInputs, BenchMeasure, BenchRun, CacheConfig, DecodeInputs,
    Error, ForwardInputs, Grads, KvCacheHandle, Output, Pass, Result,
};
use loader::load_nvrtc;

/// Whether NVRTC can be loaded; `Err` says where it was looked for. Enough for `compile_all`.
pub fn nvrtc_status() -> std::result::Result<(i32, i32), String> {
    nvrtc_version().map_err(|e| e.to_string())
}

/// One line for `flashattn info`: the device, or why the backend is unavailable.
pub fn probe_summary() -> String {
    match probe(0) {
        Ok(info) => match nvrtc_status() {
            Ok((ma, mi)) => format!("{} , NVRTC {ma}.{mi}", info.describe()),
            Err(e) => format!("{} , but {e}", info.describe()),
        },
        Err(e) => e.to_string(),
    }
}

/// The CUDA backend on one device (0 unless opened with [`CudaBackend::for_device`]).
pub struct CudaBackend {
    gpu: Gpu,
    /// The kernel family every call uses (`None`: the fastest that supports the spec).
    forced: Option<KernelKind>,
    /// Keys per block and ring depth of the Hopper kernel when not its defaults (tuning).
    block_n: Option<usize>,
    stages: Option<usize>,
    /// Tiles of the mma.sync kernel when not those of `tiles::mma_tiles` (tuning).
    mma_tiles: Option<MmaTiles>,
    /// The kernel `bench` measured fastest, where several can run a kind of problem.
    measured: std::sync::Mutex<std::collections::HashMap<select::ChoiceKey, KernelKind>>,
}

/// `FLASHATTN_CUDA_KERNEL`: a forward `KernelDef` name (hopper, hopper_fp8, mma, generic), or
/// none (automatic). Decode follows it (generic runs the CUDA-core decode kernel, the others
/// mma.sync), and so does the backward (mma: mma_bwd, generic: generic_bwd, hopper: automatic).
fn forced_kernel() -> Result<Option<KernelKind>> {
    match std::env::var("FLASHATTN_CUDA_KERNEL") {
        Ok(name) if !name.is_empty() => KernelKind::from_name(&name)
            .filter(|k| *k != KernelKind::Naive && k.def().pass == Pass::Forward)
            .map(Some)
            .ok_or_else(|| {
                Error::argument(
                    "FLASHATTN_CUDA_KERNEL",
                    name,
                    "expected hopper, hopper_fp8, mma or generic",
                )
            }),
        _ => Ok(None),
    }
}

impl CudaBackend {
    /// Opens device 0. `Error::Unavailable` says what is missing: the driver, a device, NVRTC.
    pub fn new() -> Result<CudaBackend> {
        CudaBackend::for_device(0)
    }

    /// Opens device `ordinal` (as the CUDA runtime numbers them, after `CUDA_VISIBLE_DEVICES`);
    /// its device-resident calls take pointers in that device's primary context. An ordinal
    /// past the devices the driver sees is `Error::InvalidArgument` naming it.
    pub fn for_device(ordinal: usize) -> Result<CudaBackend> {
        let gpu = Gpu::open(ordinal)?;
        load_nvrtc().map_err(|reason| Error::Unavailable {
            backend: BACKEND,
            reason,
        })?;
        let env = |name| std::env::var(name).ok().and_then(|v| v.parse().ok());
        let mma_tiles = match std::env::var("FLASHATTN_CUDA_MMA_TILES") {
            Ok(s) => Some(
                s.parse::<MmaTiles>()
                    .map_err(|e| Error::argument("FLASHATTN_CUDA_MMA_TILES", &s, e))?,
            ),
            Err(_) => None,
        };
        Ok(CudaBackend {
            gpu,
            forced: forced_kernel()?,
            block_n: env("FLASHATTN_CUDA_BLOCK_N"),
            stages: env("FLASHATTN_CUDA_STAGES"),
            mma_tiles,
            measured: Default::default(),
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

    /// Sets the mma.sync kernel's tiles (`None`: `mma_tiles`' choice); starts from
    /// `FLASHATTN_CUDA_MMA_TILES` (e.g. `128x64w4`). Checked when a spec is run.
    pub fn set_mma_tiles(&mut self, tiles: Option<MmaTiles>) {
        self.mma_tiles = tiles;
    }

    /// Forces a kernel family (`None`: automatic: the one `bench` measured fastest for such
    /// problems, else the first of hopper, mma, generic that supports the spec).
    /// Starts from `FLASHATTN_CUDA_KERNEL=hopper|mma|generic`.
    pub fn force_kernel(&mut self, kind: Option<KernelKind>) {
        self.forced = kind;
    }

    /// Queues every kernel on `stream` (a `CUstream`: cudarc's `CudaStream::cu_stream()`,
    /// PyTorch's `torch.cuda.current_stream().cuda_stream`) instead of the legacy default
    /// stream; null goes back to the default stream. Every call still returns only when its
    /// work on that stream has finished (`cuStreamSynchronize` of that stream alone, never
    /// `cuCtxSynchronize`): the caller's other streams keep running, and the caller's earlier
    /// work on `stream` (which produced the inputs) is ordered before ours without a host
    /// wait. Inputs and side tables the backend uploads itself go through the default stream,
    /// which `stream` is made to wait for with an event. Not yet run on a GPU: compile-checked
    /// only.
    ///
    /// # Safety
    /// `stream` must be null or a live stream of the backend's device's primary context, and
    /// stay alive while the backend uses it.
    pub unsafe fn set_stream(&mut self, stream: cudarc::driver::sys::CUstream) {
        // SAFETY: the caller's contract is Gpu::set_stream's.
        unsafe { self.gpu.set_stream(stream) }
    }

    /// The stream the backend launches on (null: the legacy default stream).
    pub fn stream(&self) -> cudarc::driver::sys::CUstream {
        self.gpu.stream()
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.gpu.info
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

    fn forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output> {
        let ForwardInputs { q, k, v } = inputs;
        self.forward_host(spec, q, k, v)
    }

    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        self.backward_variant_for(spec).map(|_| ())
    }

    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        self.backward_host(spec, inputs)
    }

    /// `cuda/forward/<variant>`, e.g. `cuda/forward/mma_bf16_d128_128x64w4`,
    /// `cuda/backward/mma_bwd_bf16_d128_64x128w8s2q64` (`_det` when deterministic) and
    /// `cuda/decode/<variant>/<split kernel>`, e.g. `cuda/decode/decode_mma_bf16_d128_64x3/mma_w1`:
    /// every compiled kernel variant gets its own canary check.
    fn kernel_variant(&self, spec: &AttentionSpec, pass: Pass) -> String {
        let kernel = match pass {
            Pass::Forward => self.variant_for(spec).map(|v| v.name()),
            Pass::Backward => self.backward_kernel_name(spec),
            Pass::Decode => spec
                .validate()
                .and_then(|c| self.plan_decode(&c))
                .map(|p| decode::variant_name(&p)),
        };
        let kernel = kernel.unwrap_or_else(|_| "unsupported".to_string());
        format!("{BACKEND}/{}/{kernel}", pass.name())
    }

    fn supports_decode(&self, spec: &AttentionSpec) -> Result<()> {
        self.plan_decode(&spec.validate()?).map(|_| ())
    }

    fn decode(&self, spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        self.decode_host(spec, inputs)
    }

    fn kv_cache(&self, config: CacheConfig) -> Result<Box<dyn KvCacheHandle + '_>> {
        Ok(Box::new(CudaKvCache::new(self, config)?))
    }

    fn bench(&self, run: BenchRun<'_>) -> Result<BenchMeasure> {
        // Checked once here; each pass's bench takes the checked spec.
        run.plan.runs()?;
        let pass = run.plan.pass;
        let call = BenchCall {
            c: run.spec.validate()?,
            algo: run.algo,
            plan: run.plan,
            progress: run.progress,
        };
        match pass {
            Pass::Decode => self.bench_decode(call),
            Pass::Backward => self.bench_backward(call),
            _ => self.bench_forward(call),
        }
    }
}
