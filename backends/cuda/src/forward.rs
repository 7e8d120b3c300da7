//! The forward pass: which kernel runs a spec on this GPU, the device buffers of one call, the
//! launches, and the host and device-resident entry points.

use crate::compile::BACKEND;
use crate::device::{check_device_pointers, DevBuf, DeviceInfo, Gpu};
use crate::fp8::Fp8Buffers;
use crate::params::KernelParams;
use crate::tensor_map::TensorMapParams;
use crate::tiles::{
    check_tiles, head_major_order, hopper_tiles, mma_head_dim, mma_tiles, Launch, MmaTiles,
    GENERIC_TILES, HOPPER_SMEM_LIMIT,
};
use crate::variants::{KernelKind, Tiles, Variant};
use crate::CudaBackend;
use cudarc::driver::sys;
use flashattn_core::{
    validate_inputs, AttentionSpec, CheckedSpec, DType, Error, Output, Result, Tensor, TensorRef,
};
use std::ffi::c_void;

fn unsupported(reason: impl Into<String>) -> Error {
    Error::unsupported(BACKEND, reason)
}

/// A tensor on the device: allocated by us (freed on drop) or owned by the caller.
pub(crate) enum DevTensor {
    Ours(DevBuf),
    Callers(sys::CUdeviceptr),
}

impl DevTensor {
    pub(crate) fn ptr(&self) -> sys::CUdeviceptr {
        match self {
            DevTensor::Ours(b) => b.ptr,
            DevTensor::Callers(p) => *p,
        }
    }

    /// Copies our allocation back to the host (the caller's tensors are never read back).
    pub(crate) fn to_vec(&self) -> Result<Vec<u8>> {
        match self {
            DevTensor::Ours(b) => b.to_vec(),
            DevTensor::Callers(_) => Err(Error::backend(BACKEND, "caller-owned tensor read back")),
        }
    }
}

/// Device pointers (`CUdeviceptr`) of tensors the caller owns, in the spec's layouts: q, k, v in
/// the spec's dtype (through `spec.strides` when given: then each must address its view's
/// `Strides::extent` elements), out in `spec.dtype.output()`, lse f32 (present iff
/// `spec.return_lse`).
/// They must live in the primary context of the backend's device (0, or the ordinal given to
/// `CudaBackend::for_device`), the one the CUDA runtime (and so PyTorch) and cudarc use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTensors {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: Option<u64>,
}

/// Device buffers of one problem.
pub(crate) struct Buffers {
    q: DevTensor,
    k: DevTensor,
    v: DevTensor,
    out: DevTensor,
    lse: Option<DevTensor>,
    /// cu_seqlens and ALiBi slopes: allocations beyond inputs and outputs.
    cu_q: Option<DevBuf>,
    cu_k: Option<DevBuf>,
    alibi: Option<DevBuf>,
    /// FP8: descales and the transposed V (fp8.rs).
    fp8: Option<Fp8Buffers>,
}

impl Buffers {
    /// Random inputs of `seed` (`random_inputs`), uploaded as by [`Buffers::new`]; benchmarks.
    pub(crate) fn random(spec: &CheckedSpec<'_>, seed: u64) -> Result<Buffers> {
        let (q, k, v) = flashattn_core::random_inputs(spec, seed);
        let (q, k, v) = (q.as_ref(), k.as_ref(), v.as_ref());
        Buffers::new(spec, q.as_bytes(), k.as_bytes(), v.as_bytes())
    }

    /// Uploads host inputs into fresh allocations, with a zeroed output and an LSE preset to
    /// -inf (rows of no sequence keep those values).
    pub(crate) fn new(spec: &CheckedSpec<'_>, q: &[u8], k: &[u8], v: &[u8]) -> Result<Buffers> {
        let out_bytes = spec.sizes.out * spec.dtype.output().size_bytes();
        let lse = if spec.return_lse {
            let init = vec![f32::NEG_INFINITY; spec.sizes.lse];
            Some(DevTensor::Ours(DevBuf::from_bytes(bytemuck::cast_slice(
                &init,
            ))?))
        } else {
            None
        };
        let ours = DevTensor::Ours;
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
    fn callers(spec: &CheckedSpec<'_>, t: &DeviceTensors) -> Result<Buffers> {
        Buffers::with_tensors(
            spec,
            DevTensor::Callers(t.q),
            DevTensor::Callers(t.k),
            DevTensor::Callers(t.v),
            DevTensor::Callers(t.out),
            t.lse.map(DevTensor::Callers),
        )
    }

    pub(crate) fn with_tensors(
        spec: &CheckedSpec<'_>,
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
        let fp8 = match spec.dtype {
            DType::Fp8E4m3 => Some(Fp8Buffers::new(spec)?),
            _ => None,
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
            fp8,
        })
    }

    pub(crate) fn extra_bytes(&self) -> u64 {
        [&self.cu_q, &self.cu_k, &self.alibi]
            .iter()
            .filter_map(|b| b.as_ref())
            .map(|b| b.bytes as u64)
            .sum::<u64>()
            + self.fp8.as_ref().map_or(0, |f| f.bytes() as u64)
    }

    /// The kernels' parameters for `spec` with query blocks of `block_m`, and our pointers.
    pub(crate) fn params(&self, spec: &CheckedSpec<'_>, block_m: usize) -> Result<KernelParams> {
        let mut p = KernelParams::new(spec, block_m)?;
        self.set_pointers(&mut p);
        Ok(p)
    }

    pub(crate) fn set_pointers(&self, p: &mut KernelParams) {
        p.q = self.q.ptr();
        p.k = self.k.ptr();
        p.v = self.v.ptr();
        p.out = self.out.ptr();
        p.lse = self.lse.as_ref().map_or(0, |b| b.ptr());
        p.cu_seqlens_q = self.cu_q.as_ref().map_or(0, |b| b.ptr);
        p.cu_seqlens_k = self.cu_k.as_ref().map_or(0, |b| b.ptr);
        p.alibi = self.alibi.as_ref().map_or(0, |b| b.ptr);
    }
}

pub(crate) fn arg<T>(x: &mut T) -> *mut c_void {
    (x as *mut T).cast()
}

/// Launches `variant`'s entry point with `l` (from [`flash_launch`]).
pub(crate) fn launch(
    gpu: &Gpu,
    variant: &Variant,
    l: Launch,
    args: &mut [*mut c_void],
) -> Result<()> {
    if l.smem > gpu.info.smem_optin {
        return Err(unsupported(format!(
            "kernel {} needs {} bytes of shared memory, this GPU allows {}",
            variant.name(),
            l.smem,
            gpu.info.smem_optin
        )));
    }
    let f = gpu.function(variant, 0, l.smem)?;
    gpu.launch(f, l.grid, l.block, l.smem, args)
}

/// What decides which of two tensor-core kernels wins, as far as `bench` measures it: the
/// dtype, the head dims and whether a mask skips blocks. Sizes are left out, so that a
/// measurement on the runtime's shrunk copy of a problem applies to the problem itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ChoiceKey {
    dtype: DType,
    head_dim: usize,
    head_dim_v: usize,
    masked: bool,
}

impl ChoiceKey {
    pub(crate) fn of(spec: &CheckedSpec<'_>) -> ChoiceKey {
        ChoiceKey {
            dtype: spec.dtype,
            head_dim: spec.head_dim,
            head_dim_v: spec.head_dim_v,
            masked: spec.mask.is_masked(),
        }
    }
}

/// The Hopper kernel for `spec` on `info`'s GPU with optional tile overrides, or why not.
pub fn select_hopper(
    spec: &CheckedSpec<'_>,
    info: &DeviceInfo,
    block_n: Option<usize>,
    stages: Option<usize>,
) -> std::result::Result<Variant, String> {
    let arch = info.arch();
    if arch != "sm_90a" {
        return Err(format!(
            "the Hopper kernel needs sm_90a, this GPU is {arch}"
        ));
    }
    if !spec.strides.is_contiguous() {
        // Its TMA tensor maps address q, k, v as [tokens, heads, dim] with one token stride.
        return Err(format!(
            "the Hopper kernel reads contiguous q, k, v only, not strided inputs ({:?})",
            spec.strides
        ));
    }
    if spec.dtype == DType::Fp8E4m3 {
        return crate::fp8::select(spec, info, block_n, stages);
    }
    if !matches!(spec.dtype, DType::Bf16 | DType::F16) {
        return Err(format!(
            "the Hopper kernel takes bf16, f16 or fp8e4m3, not {}",
            spec.dtype
        ));
    }
    if spec.head_dim != spec.head_dim_v || hopper_tiles(spec.head_dim).is_none() {
        return Err(format!(
            "the Hopper kernel takes head_dim = head_dim_v in 64, 128, 256, not {}/{}",
            spec.head_dim, spec.head_dim_v
        ));
    }
    let tiles = check_tiles(spec.head_dim, block_n, stages)?;
    let smem = tiles.smem_bytes(spec.head_dim);
    if smem > info.smem_optin.min(HOPPER_SMEM_LIMIT) {
        return Err(format!(
            "the Hopper kernel needs {smem} bytes of shared memory"
        ));
    }
    let score_mod = spec.softcap > 0.0 || spec.alibi.is_some();
    Ok(Variant::hopper(spec.dtype, spec.head_dim, score_mod, tiles))
}

/// The mma.sync kernel for `spec` on a GPU of `compute_capability` whose blocks may use
/// `smem_optin` bytes of shared memory (`tiles`: an override of `mma_tiles`), or why not.
pub fn select_mma(
    spec: &CheckedSpec<'_>,
    compute_capability: (i32, i32),
    smem_optin: usize,
    tiles: Option<MmaTiles>,
) -> std::result::Result<Variant, String> {
    let (major, minor) = compute_capability;
    if major < 8 {
        return Err(format!(
            "the mma.sync kernel needs sm_80 or newer, this GPU is sm_{major}{minor}"
        ));
    }
    if !matches!(spec.dtype, DType::Bf16 | DType::F16) {
        return Err(format!(
            "the mma.sync kernel takes bf16 or f16, not {} (f32 runs the portable f32 kernel: \
             tf32 tensor cores would miss the f32 accuracy)",
            spec.dtype
        ));
    }
    // Its rows go by 16-byte copies whenever the head dims allow (mma_fwd.cu keeps no
    // register for a stride check: its largest tiles use all 255).
    let st = &spec.strides;
    for (name, s) in [("q", st.q), ("k", st.k), ("v", st.v)] {
        if let Some(s) = s.filter(|s| (s.batch | s.seq | s.head) % 8 != 0) {
            return Err(format!(
                "the mma.sync kernel reads strided rows by 16-byte copies: {name}'s strides \
                 {s:?} must be multiples of 8 elements (the portable kernel takes any)"
            ));
        }
    }
    let bucket = mma_head_dim(spec.head_dim, spec.head_dim_v).ok_or_else(|| {
        format!(
            "the mma.sync kernel takes head dims up to 256, not {}/{}",
            spec.head_dim, spec.head_dim_v
        )
    })?;
    let tiles = match tiles {
        Some(t) => {
            t.check(bucket)?;
            if t.smem_bytes(bucket) > smem_optin {
                return Err(format!(
                    "mma tiles {t:?} need {} bytes of shared memory, this GPU allows {smem_optin}",
                    t.smem_bytes(bucket)
                ));
            }
            t
        }
        None => mma_tiles(bucket, smem_optin)?,
    };
    Ok(Variant::mma(spec.dtype, bucket, tiles))
}

/// The portable kernel for `spec` on a GPU whose blocks may use `smem_optin` bytes of shared
/// memory, or why not.
pub fn select_generic(
    spec: &CheckedSpec<'_>,
    smem_optin: usize,
) -> std::result::Result<Variant, String> {
    let smem = GENERIC_TILES.smem_bytes(spec.head_dim, spec.head_dim_v);
    if smem > smem_optin {
        return Err(format!(
            "head_dim {} / head_dim_v {} needs {smem} bytes of shared memory in the portable kernel, this GPU allows {smem_optin}",
            spec.head_dim, spec.head_dim_v
        ));
    }
    Ok(Variant::generic(spec.dtype))
}

/// The parameters (pointers left 0) and the launch of the flash kernel `variant` for `spec`
/// on a GPU with `sm_count` SMs.
pub fn flash_launch(
    spec: &CheckedSpec<'_>,
    variant: &Variant,
    sm_count: usize,
) -> Result<(KernelParams, Launch)> {
    let (p, launch) = match variant.tiles {
        Tiles::Hopper(t) => {
            let mut p = KernelParams::new(spec, t.block_m)?;
            p.head_major_tiles = head_major_order(spec.causal, spec.head_dim) as i32;
            let elem = spec.dtype.size_bytes();
            let l = t.launch(spec.head_dim, elem, p.total_tiles as usize, sm_count);
            (p, l)
        }
        Tiles::Mma(t) => {
            let mut p = KernelParams::new(spec, t.block_m)?;
            p.head_major_tiles = 1;
            let l = t.launch(variant.head_dim, p.total_tiles as usize);
            (p, l)
        }
        Tiles::Generic(t) => {
            let p = KernelParams::new(spec, t.block_m())?;
            let l = t.launch(
                p.num_m_blocks as usize,
                spec.heads_q,
                spec.batch,
                spec.head_dim,
                spec.head_dim_v,
            );
            (p, l)
        }
        Tiles::Decode(_) | Tiles::MmaBwd(_) | Tiles::GenericBwd(_) | Tiles::None => {
            return Err(unsupported(format!(
                "{} is not a forward flash kernel",
                variant.name()
            )))
        }
    };
    Ok((p, launch.map_err(unsupported)?))
}

impl CudaBackend {
    /// The kernel variant that runs `spec` here, or why none does.
    pub fn variant_for(&self, spec: &AttentionSpec) -> Result<Variant> {
        self.choose(&spec.validate()?)
    }

    /// The forced kernel family; else the one `bench` measured fastest for problems like
    /// `spec` (see [`ChoiceKey`]); else the first of Hopper (wgmma: measured 1.6-2x faster than
    /// FlashAttention-2 on an H100, PERF_NOTES.md), mma.sync, the portable kernel that can run
    /// `spec` on this GPU.
    pub(crate) fn choose(&self, spec: &CheckedSpec<'_>) -> Result<Variant> {
        if let Some(kind) = self.forced {
            return self.try_kind(spec, kind).map_err(unsupported);
        }
        let candidates = self.candidates(spec)?;
        let measured = self.measured.lock().unwrap_or_else(|e| e.into_inner());
        let pick = measured
            .get(&ChoiceKey::of(spec))
            .and_then(|kind| candidates.iter().find(|v| v.kind == *kind));
        Ok(*pick.unwrap_or(&candidates[0]))
    }

    /// Every kernel family that can run `spec` here, in the default order (never empty).
    pub(crate) fn candidates(&self, spec: &CheckedSpec<'_>) -> Result<Vec<Variant>> {
        let kinds: &[KernelKind] = match spec.dtype {
            // Only Hopper has FP8 tensor cores that the backend drives.
            DType::Fp8E4m3 => &[KernelKind::Hopper],
            _ => &[KernelKind::Hopper, KernelKind::Mma, KernelKind::Generic],
        };
        let (mut ok, mut why) = (Vec::new(), Vec::new());
        for &kind in kinds {
            match self.try_kind(spec, kind) {
                Ok(v) => ok.push(v),
                Err(e) => why.push(e),
            }
        }
        if ok.is_empty() {
            return Err(unsupported(why.join("; ")));
        }
        Ok(ok)
    }

    fn try_kind(
        &self,
        spec: &CheckedSpec<'_>,
        kind: KernelKind,
    ) -> std::result::Result<Variant, String> {
        match kind {
            KernelKind::HopperFp8 if spec.dtype != DType::Fp8E4m3 => Err(format!(
                "the hopper_fp8 kernel takes fp8e4m3, not {}",
                spec.dtype
            )),
            KernelKind::Hopper | KernelKind::HopperFp8 => self.hopper_variant(spec),
            KernelKind::Mma => self.mma_variant(spec),
            KernelKind::Generic => self.generic_variant(spec),
            other => Err(format!(
                "the {} kernel is not a forward flash kernel",
                other.def().name
            )),
        }
    }

    /// Remembers that `kind` was the fastest kernel for problems like `spec`.
    pub(crate) fn record_choice(&self, spec: &CheckedSpec<'_>, kind: KernelKind) {
        let mut measured = self.measured.lock().unwrap_or_else(|e| e.into_inner());
        measured.insert(ChoiceKey::of(spec), kind);
    }

    fn hopper_variant(&self, spec: &CheckedSpec<'_>) -> std::result::Result<Variant, String> {
        select_hopper(spec, &self.gpu.info, self.block_n, self.stages)
    }

    fn mma_variant(&self, spec: &CheckedSpec<'_>) -> std::result::Result<Variant, String> {
        let info = &self.gpu.info;
        select_mma(
            spec,
            info.compute_capability,
            info.smem_optin,
            self.mma_tiles,
        )
    }

    fn generic_variant(&self, spec: &CheckedSpec<'_>) -> std::result::Result<Variant, String> {
        select_generic(spec, self.gpu.info.smem_optin)
    }

    /// Queues the flash kernel for `spec` on the backend's stream (no synchronisation).
    pub(crate) fn launch_flash(
        &self,
        spec: &CheckedSpec<'_>,
        variant: &Variant,
        bufs: &Buffers,
    ) -> Result<()> {
        if spec.sizes.max_q_len == 0 {
            return Ok(());
        }
        let (mut p, l) = flash_launch(spec, variant, self.gpu.info.sm_count)?;
        bufs.set_pointers(&mut p);
        match variant.tiles {
            Tiles::Hopper(tiles) => {
                let dt = spec.dtype;
                let (qt, kt) = (spec.sizes.q_tokens, spec.sizes.k_tokens);
                let map = |tokens, heads, dim, rows| {
                    TensorMapParams::of_dtype(dt, tokens, heads, dim, rows)
                };
                let mut tq = map(qt, spec.heads_q, spec.head_dim, tiles.block_m)?
                    .encode(bufs.q.ptr(), dt)?;
                let mut tk = map(kt, spec.heads_kv, spec.head_dim, tiles.block_n)?
                    .encode(bufs.k.ptr(), dt)?;
                let Some(fp8) = &bufs.fp8 else {
                    let mut tv = map(kt, spec.heads_kv, spec.head_dim_v, tiles.block_n)?
                        .encode(bufs.v.ptr(), dt)?;
                    let args = &mut [arg(&mut tq), arg(&mut tk), arg(&mut tv), arg(&mut p)];
                    return launch(&self.gpu, variant, l, args);
                };
                // FP8: V transposed first (same stream), then the attention kernel reads Vt.
                let mut f = fp8.args();
                let transpose = fp8.tables.transpose_launch(spec.heads_kv, spec.head_dim_v);
                if let Some(t) = transpose.map_err(unsupported)? {
                    let func = self.gpu.function(variant, 1, t.smem)?;
                    let args = &mut [arg(&mut p), arg(&mut f)];
                    self.gpu.launch(func, t.grid, t.block, t.smem, args)?;
                }
                let vt_map =
                    TensorMapParams::fp8_vt(fp8.tables.vt_keys(), spec.heads_kv, spec.head_dim_v)?;
                let mut tv = vt_map.encode(fp8.vt.ptr, dt)?;
                let args = &mut [
                    arg(&mut tq),
                    arg(&mut tk),
                    arg(&mut tv),
                    arg(&mut p),
                    arg(&mut f),
                ];
                launch(&self.gpu, variant, l, args)
            }
            _ => launch(&self.gpu, variant, l, &mut [arg(&mut p)]),
        }
    }

    /// The forward pass on host data (`Backend::forward`).
    pub(crate) fn forward_host(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        let checked = validate_inputs(spec, &q, &k, &v)?;
        let variant = self.choose(&checked)?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::new(&checked, q.as_bytes(), k.as_bytes(), v.as_bytes())?;
        self.launch_flash(&checked, &variant, &bufs)?;
        self.gpu.synchronize()?;
        let out = Tensor::from_bytes(spec.dtype.output(), &bufs.out.to_vec()?)?;
        let lse = match &bufs.lse {
            Some(b) => Some(bytemuck::pod_collect_to_vec(&b.to_vec()?)),
            None => None,
        };
        Ok(Output { out, lse })
    }

    /// The forward pass on tensors already on the GPU (no host round trip); returns when the
    /// kernel has finished. Tokens of no varlen sequence are left as the caller had them.
    ///
    /// # Safety
    /// Each pointer must address at least its tensor's bytes for `spec` (see [`DeviceTensors`])
    /// in the backend's device's primary context and stay valid for the call; `out` and `lse` must not
    /// overlap the inputs or each other.
    pub unsafe fn forward_device(
        &self,
        spec: &AttentionSpec,
        tensors: &DeviceTensors,
    ) -> Result<()> {
        let checked = spec.validate()?;
        let variant = self.choose(&checked)?;
        if spec.return_lse != tensors.lse.is_some() {
            return Err(Error::argument(
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
        check_device_pointers(named.into_iter().chain(tensors.lse.map(|p| ("lse", p))))?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::callers(&checked, tensors)?;
        self.launch_flash(&checked, &variant, &bufs)?;
        self.gpu.synchronize()
    }
}
