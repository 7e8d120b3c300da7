//! Which forward kernel runs a spec: each family's own conditions (`select_*`), the default
//! order among those that can run it, and the backend's choice (forced, measured, default).
//! The free functions need no GPU, only a [`DeviceInfo`]: the runtime's canary and host-side
//! tests ask them which kernel a call would run on, say, an H100.

use crate::compile::BACKEND;
use crate::device::DeviceInfo;
use crate::tiles::{
    check_tiles, hopper_tiles, mma_head_dim, mma_tiles, MmaTiles, GENERIC_TILES, HOPPER_SMEM_LIMIT,
};
use crate::variants::{KernelKind, Variant};
use crate::CudaBackend;
use flashattn_core::{AttentionSpec, CheckedSpec, DType, Error, Result};

fn unsupported(reason: impl Into<String>) -> Error {
    Error::unsupported(BACKEND, reason)
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

/// Tile overrides of the forward kernels (tuning); the default leaves each kernel its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardTiles {
    /// Keys per block and ring depth of the Hopper kernel.
    pub block_n: Option<usize>,
    pub stages: Option<usize>,
    /// Tiles of the mma.sync kernel (else `tiles::mma_tiles`).
    pub mma: Option<MmaTiles>,
}

/// The variant of forward family `kind` that runs `spec` on `info`'s GPU, or why none does.
pub fn select_forward_kind(
    spec: &CheckedSpec<'_>,
    info: &DeviceInfo,
    kind: KernelKind,
    tiles: &ForwardTiles,
) -> std::result::Result<Variant, String> {
    match kind {
        KernelKind::HopperFp8 if spec.dtype != DType::Fp8E4m3 => Err(format!(
            "the hopper_fp8 kernel takes fp8e4m3, not {}",
            spec.dtype
        )),
        KernelKind::Hopper | KernelKind::HopperFp8 => {
            select_hopper(spec, info, tiles.block_n, tiles.stages)
        }
        KernelKind::Mma => select_mma(spec, info.compute_capability, info.smem_optin, tiles.mma),
        KernelKind::Generic => select_generic(spec, info.smem_optin),
        other => Err(format!(
            "the {} kernel is not a forward flash kernel",
            other.def().name
        )),
    }
}

/// Every forward family that can run `spec` on `info`'s GPU, in the default order: Hopper
/// (wgmma: measured 1.6-2x faster than FlashAttention-2 on an H100, PERF_NOTES.md), mma.sync,
/// the portable kernel. Never empty: `Err` joins each family's refusal.
pub fn forward_candidates(
    spec: &CheckedSpec<'_>,
    info: &DeviceInfo,
    tiles: &ForwardTiles,
) -> std::result::Result<Vec<Variant>, String> {
    let kinds: &[KernelKind] = match spec.dtype {
        // Only Hopper has FP8 tensor cores that the backend drives.
        DType::Fp8E4m3 => &[KernelKind::Hopper],
        _ => &[KernelKind::Hopper, KernelKind::Mma, KernelKind::Generic],
    };
    let (mut ok, mut why) = (Vec::new(), Vec::new());
    for &kind in kinds {
        match select_forward_kind(spec, info, kind, tiles) {
            Ok(v) => ok.push(v),
            Err(e) => why.push(e),
        }
    }
    if ok.is_empty() {
        return Err(why.join("; "));
    }
    Ok(ok)
}

impl CudaBackend {
    /// The kernel variant that runs `spec` here, or why none does.
    pub fn variant_for(&self, spec: &AttentionSpec) -> Result<Variant> {
        self.choose(&spec.validate()?)
    }

    /// The forced kernel family; else the one `bench` measured fastest for problems like
    /// `spec` (see [`ChoiceKey`]); else the first of [`forward_candidates`].
    pub(crate) fn choose(&self, spec: &CheckedSpec<'_>) -> Result<Variant> {
        let tiles = self.forward_tiles();
        if let Some(kind) = self.forced {
            return select_forward_kind(spec, &self.gpu.info, kind, &tiles).map_err(unsupported);
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
        forward_candidates(spec, &self.gpu.info, &self.forward_tiles()).map_err(unsupported)
    }

    /// Remembers that `kind` was the fastest kernel for problems like `spec`.
    pub(crate) fn record_choice(&self, spec: &CheckedSpec<'_>, kind: KernelKind) {
        let mut measured = self.measured.lock().unwrap_or_else(|e| e.into_inner());
        measured.insert(ChoiceKey::of(spec), kind);
    }

    fn forward_tiles(&self) -> ForwardTiles {
        ForwardTiles {
            block_n: self.block_n,
            stages: self.stages,
            mma: self.mma_tiles,
        }
    }
}
