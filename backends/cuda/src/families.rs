//! The table of kernel families: the sources NVRTC compiles for each, its entry points, the
//! archs it builds for and the SASS it must show ([`KernelKind::def`]).

use flashattn_core::Pass;

const PARAMS: (&str, &str) = ("params.cuh", include_str!("../kernels/params.cuh"));
const DTYPE: (&str, &str) = ("dtype.cuh", include_str!("../kernels/dtype.cuh"));
const MASK: (&str, &str) = ("mask.cuh", include_str!("../kernels/mask.cuh"));
const SCORE_MOD: (&str, &str) = ("score_mod.cuh", include_str!("../kernels/score_mod.cuh"));
const WARP: (&str, &str) = ("warp.cuh", include_str!("../kernels/warp.cuh"));
const TILES: (&str, &str) = ("tiles.cuh", include_str!("../kernels/tiles.cuh"));
const PTX: (&str, &str) = ("ptx.cuh", include_str!("../kernels/ptx.cuh"));
const PTX_HOPPER: (&str, &str) = ("ptx_hopper.cuh", include_str!("../kernels/ptx_hopper.cuh"));
const WGMMA: (&str, &str) = ("wgmma.cuh", include_str!("../kernels/wgmma.cuh"));
const HOPPER: (&str, &str) = ("hopper_fwd.cu", include_str!("../kernels/hopper_fwd.cu"));
const FP8_VT: (&str, &str) = ("fp8_vt.cu", include_str!("../kernels/fp8_vt.cu"));
const MMA: (&str, &str) = ("mma_fwd.cu", include_str!("../kernels/mma_fwd.cu"));
const GENERIC: (&str, &str) = ("generic_fwd.cu", include_str!("../kernels/generic_fwd.cu"));
const NAIVE: (&str, &str) = ("naive.cu", include_str!("../kernels/naive.cu"));
const DECODE_H: (&str, &str) = ("decode.cuh", include_str!("../kernels/decode.cuh"));
const APPEND: (&str, &str) = ("append.cu", include_str!("../kernels/append.cu"));
const COMBINE: (&str, &str) = ("combine.cu", include_str!("../kernels/combine.cu"));
const DECODE_MMA: (&str, &str) = ("decode_mma.cu", include_str!("../kernels/decode_mma.cu"));
const DECODE_SIMT: (&str, &str) = ("decode_simt.cu", include_str!("../kernels/decode_simt.cu"));
const MMA_TILE: (&str, &str) = ("mma_tile.cuh", include_str!("../kernels/mma_tile.cuh"));
const BWD: (&str, &str) = ("bwd.cuh", include_str!("../kernels/bwd.cuh"));
const BWD_PREP: (&str, &str) = ("bwd_prep.cu", include_str!("../kernels/bwd_prep.cu"));
const MMA_BWD: (&str, &str) = ("mma_bwd.cu", include_str!("../kernels/mma_bwd.cu"));
const GENERIC_BWD: (&str, &str) = ("generic_bwd.cu", include_str!("../kernels/generic_bwd.cu"));

/// Which kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// FlashAttention-3-style TMA + wgmma kernel; sm_90a only.
    Hopper,
    /// The same kernel for FP8 e4m3 (QGMMA), after a pass that transposes V; sm_90a only.
    HopperFp8,
    /// FlashAttention-2-style mma.sync + ldmatrix + cp.async kernel; sm_80 and later.
    Mma,
    /// Portable flash kernel on CUDA cores; any sm_70+ GPU, any shape, f32.
    Generic,
    /// Materialised scores, for benchmarks.
    Naive,
    /// Decode against a KV cache: append, split-KV attention with mma.sync, combine; sm_80+.
    DecodeMma,
    /// The same on CUDA cores (f32 caches); sm_80+ (cp.async).
    DecodeSimt,
    /// FlashAttention-2's backward on mma.sync (sm_80+), f16/bf16.
    MmaBwd,
    /// The portable backward on CUDA cores (sm_70+), any dtype.
    GenericBwd,
}

/// One kernel family.
#[derive(Debug)]
pub struct KernelDef {
    /// Short name, the start of every variant name ("hopper", "mma", ...).
    pub name: &'static str,
    pub pass: Pass,
    /// (file name, text), concatenated in this order into the source NVRTC compiles (the
    /// kernels include no headers, so NVRTC needs no CUDA include path).
    pub sources: &'static [(&'static str, &'static str)],
    pub entry_points: &'static [&'static str],
    /// Oldest compute capability (major * 10 + minor) the kernel builds for.
    pub min_sm: u32,
    /// Built for this arch only (wgmma and setmaxnreg need sm_90a).
    pub only_arch: Option<&'static str>,
    /// SASS opcodes its cubin must contain (tests/sass.rs): the instructions it exists for;
    /// `A|B` where archs name it differently.
    pub sass_needs: &'static [&'static str],
}

const HOPPER_DEF: KernelDef = KernelDef {
    name: "hopper",
    pass: Pass::Forward,
    sources: &[
        PARAMS, DTYPE, MASK, SCORE_MOD, TILES, PTX, PTX_HOPPER, WGMMA, HOPPER,
    ],
    entry_points: &["fa_hopper_fwd"],
    min_sm: 90,
    only_arch: Some("sm_90a"),
    sass_needs: &["HGMMA", "UTMALDG"],
};

const HOPPER_FP8_DEF: KernelDef = KernelDef {
    name: "hopper_fp8",
    pass: Pass::Forward,
    sources: &[
        PARAMS, DTYPE, MASK, SCORE_MOD, TILES, PTX, PTX_HOPPER, WGMMA, FP8_VT, HOPPER,
    ],
    entry_points: &["fa_hopper_fwd", "fa_fp8_transpose_v"],
    min_sm: 90,
    only_arch: Some("sm_90a"),
    // F2FP...E4M3: P converted to e4m3 in registers.
    sass_needs: &["QGMMA", "UTMALDG", "F2FP.SATFINITE.E4M3.F32"],
};

const MMA_DEF: KernelDef = KernelDef::any_arch(
    "mma",
    Pass::Forward,
    &[PARAMS, DTYPE, MASK, SCORE_MOD, TILES, PTX, MMA_TILE, MMA],
    &["fa_mma_fwd"],
    80,
    MMA_SASS,
);

const GENERIC_DEF: KernelDef = KernelDef::any_arch(
    "generic",
    Pass::Forward,
    &[PARAMS, DTYPE, MASK, SCORE_MOD, WARP, GENERIC],
    &["fa_generic_fwd"],
    70,
    &[],
);

const NAIVE_DEF: KernelDef = KernelDef::any_arch(
    "naive",
    Pass::Forward,
    &[PARAMS, DTYPE, MASK, SCORE_MOD, NAIVE],
    &["naive_scores", "naive_softmax_pv"],
    70,
    &[],
);

/// The decode families' entry points, in this order: the split kernel(s) come last
/// (`decode_tiles::tile_rows` picks among them).
const DECODE_MMA_DEF: KernelDef = KernelDef::any_arch(
    "decode_mma",
    Pass::Decode,
    &[
        PARAMS, DTYPE, MASK, SCORE_MOD, PTX, DECODE_H, APPEND, COMBINE, DECODE_MMA,
    ],
    &[
        "fa_decode_append",
        "fa_decode_combine",
        "fa_decode_mma_w1",
        "fa_decode_mma_w4",
    ],
    80,
    MMA_SASS,
);

const DECODE_SIMT_DEF: KernelDef = KernelDef::any_arch(
    "decode_simt",
    Pass::Decode,
    &[
        PARAMS,
        DTYPE,
        MASK,
        SCORE_MOD,
        WARP,
        PTX,
        DECODE_H,
        APPEND,
        COMBINE,
        DECODE_SIMT,
    ],
    &["fa_decode_append", "fa_decode_combine", "fa_decode_simt"],
    80,
    &["LDGSTS"],
);

/// Entry points every decode family has: the append and the combine kernels.
pub const DECODE_APPEND_ENTRY: usize = 0;
pub const DECODE_COMBINE_ENTRY: usize = 1;

/// Every backward family has these entry points, in this order (backward.rs `Stage`): the
/// pre-processing (delta, dq accumulator zeroed), the post-processing (dq from the accumulator),
/// the main kernel over key blocks, the deterministic dq kernel.
const MMA_BWD_DEF: KernelDef = KernelDef::any_arch(
    "mma_bwd",
    Pass::Backward,
    &[
        PARAMS, DTYPE, MASK, SCORE_MOD, WARP, PTX, MMA_TILE, BWD, BWD_PREP, MMA_BWD,
    ],
    &["fa_bwd_prep", "fa_bwd_post", "fa_mma_bwd", "fa_mma_bwd_dq"],
    80,
    // dq's f32 atomicAdd: RED before sm_90, REDG on sm_90.
    &["HMMA.16816.F32", "LDSM", "LDGSTS", "RED|REDG"],
);

const GENERIC_BWD_DEF: KernelDef = KernelDef::any_arch(
    "generic_bwd",
    Pass::Backward,
    &[
        PARAMS,
        DTYPE,
        MASK,
        SCORE_MOD,
        WARP,
        BWD,
        BWD_PREP,
        GENERIC_BWD,
    ],
    &[
        "fa_bwd_prep",
        "fa_bwd_post",
        "fa_generic_bwd",
        "fa_generic_bwd_dq",
    ],
    70,
    &["RED|REDG"],
);

/// What every mma.sync family's cubin shows: the tensor-core MMA, ldmatrix, cp.async.
const MMA_SASS: &[&str] = &["HMMA.16816.F32", "LDSM", "LDGSTS"];

impl KernelDef {
    /// A family built for every arch from `min_sm` on.
    const fn any_arch(
        name: &'static str,
        pass: Pass,
        sources: &'static [(&'static str, &'static str)],
        entry_points: &'static [&'static str],
        min_sm: u32,
        sass_needs: &'static [&'static str],
    ) -> KernelDef {
        KernelDef {
            name,
            pass,
            sources,
            entry_points,
            min_sm,
            only_arch: None,
            sass_needs,
        }
    }
}

impl KernelKind {
    pub const ALL: [KernelKind; 9] = [
        KernelKind::Hopper,
        KernelKind::HopperFp8,
        KernelKind::Mma,
        KernelKind::Generic,
        KernelKind::Naive,
        KernelKind::DecodeMma,
        KernelKind::DecodeSimt,
        KernelKind::MmaBwd,
        KernelKind::GenericBwd,
    ];

    pub fn def(self) -> &'static KernelDef {
        match self {
            KernelKind::Hopper => &HOPPER_DEF,
            KernelKind::HopperFp8 => &HOPPER_FP8_DEF,
            KernelKind::Mma => &MMA_DEF,
            KernelKind::Generic => &GENERIC_DEF,
            KernelKind::Naive => &NAIVE_DEF,
            KernelKind::DecodeMma => &DECODE_MMA_DEF,
            KernelKind::DecodeSimt => &DECODE_SIMT_DEF,
            KernelKind::MmaBwd => &MMA_BWD_DEF,
            KernelKind::GenericBwd => &GENERIC_BWD_DEF,
        }
    }

    /// The kind named `name` (a `KernelDef::name`), for `FLASHATTN_CUDA_KERNEL`.
    pub fn from_name(name: &str) -> Option<KernelKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.def().name.eq_ignore_ascii_case(name))
    }
}
