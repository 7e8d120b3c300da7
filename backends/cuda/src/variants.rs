//! Every kernel the backend compiles. [`KernelKind::def`] (families.rs) is the table of kernel
//! families; a [`Variant`] is one compiled unit of a family: dtype, head dim, tiles, which
//! reach the kernel as `-D` defines. A new kernel is one more `KernelKind`, its `KernelDef`
//! (families.rs) and its arm in `defines`; the
//! compile and SASS tests iterate over [`variants_for_arch`].

use crate::backward::tiles::{
    mma_bwd_tiles, GenericBwdTiles, MmaBwdTiles, GENERIC_BWD_TILES, MMA_BWD_HEAD_DIMS,
};
use crate::decode_tiles::{decode_tiles, DecodeTiles, DECODE_HEAD_DIMS, DECODE_WARPS};
pub use crate::families::{KernelDef, KernelKind, DECODE_APPEND_ENTRY, DECODE_COMBINE_ENTRY};
use crate::fp8::{fp8_score_mod_builds, hopper_fp8_tiles, FP8_HEAD_DIMS};
use crate::params::{DecodeParams, KernelParams};
use crate::tensor_map::{BOX_COLS, FP8_BOX_COLS};
use crate::tiles::{
    hopper_tiles, mma_tiles, smem_optin_of_arch, GenericTiles, HopperTiles, MmaTiles,
    GENERIC_TILES, HOPPER_HEAD_DIMS, HOPPER_THREADS, MMA_HEAD_DIMS,
};
use flashattn_core::{DType, Pass, MAX_HEAD_DIM};

/// The archs CI compiles every variant for (tests/sass.rs) and `compile_all` is meant for.
pub const CI_ARCHS: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90a"];

/// The tiles a variant is compiled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tiles {
    Hopper(HopperTiles),
    Mma(MmaTiles),
    Generic(GenericTiles),
    Decode(DecodeTiles),
    MmaBwd(MmaBwdTiles),
    GenericBwd(GenericBwdTiles),
    None,
}

/// One compiled unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub kind: KernelKind,
    pub dtype: DType,
    /// The head dim the kernel is compiled for: exactly head_dim (Hopper), the bucket that
    /// holds head_dim and head_dim_v (mma); 0 where it is a run-time value.
    pub head_dim: usize,
    /// Hopper only: softcap or ALiBi present (a separate build keeps the plain path lean).
    pub score_mod: bool,
    pub tiles: Tiles,
}

impl Variant {
    /// The Hopper kernel; FP8 e4m3 selects its FP8 build ([`KernelKind::HopperFp8`]).
    pub fn hopper(dtype: DType, head_dim: usize, score_mod: bool, tiles: HopperTiles) -> Self {
        Variant {
            kind: if dtype == DType::Fp8E4m3 {
                KernelKind::HopperFp8
            } else {
                KernelKind::Hopper
            },
            dtype,
            head_dim,
            score_mod,
            tiles: Tiles::Hopper(tiles),
        }
    }
    pub fn mma(dtype: DType, head_dim: usize, tiles: MmaTiles) -> Self {
        Variant {
            kind: KernelKind::Mma,
            dtype,
            head_dim,
            score_mod: false,
            tiles: Tiles::Mma(tiles),
        }
    }
    pub fn generic(dtype: DType) -> Self {
        Variant {
            kind: KernelKind::Generic,
            dtype,
            head_dim: 0,
            score_mod: false,
            tiles: Tiles::Generic(GENERIC_TILES),
        }
    }
    /// A decode family (`DecodeMma` or `DecodeSimt`) for bucket `head_dim`.
    pub fn decode(kind: KernelKind, dtype: DType, head_dim: usize, tiles: DecodeTiles) -> Self {
        Variant {
            kind,
            dtype,
            head_dim,
            score_mod: false,
            tiles: Tiles::Decode(tiles),
        }
    }
    pub fn mma_bwd(dtype: DType, head_dim: usize, tiles: MmaBwdTiles) -> Self {
        Variant {
            kind: KernelKind::MmaBwd,
            dtype,
            head_dim,
            score_mod: false,
            tiles: Tiles::MmaBwd(tiles),
        }
    }
    pub fn generic_bwd(dtype: DType) -> Self {
        Variant {
            kind: KernelKind::GenericBwd,
            dtype,
            head_dim: 0,
            score_mod: false,
            tiles: Tiles::GenericBwd(GENERIC_BWD_TILES),
        }
    }
    pub fn naive(dtype: DType) -> Self {
        Variant {
            kind: KernelKind::Naive,
            dtype,
            head_dim: 0,
            score_mod: false,
            tiles: Tiles::None,
        }
    }

    /// A file-name-safe name, e.g. `hopper_bf16_d128`, `hopper_f16_d64_mod_n176_s3`,
    /// `mma_bf16_d96_128x64w4`, `generic_f32`.
    pub fn name(&self) -> String {
        let base = format!("{}_{}", self.kind.def().name, self.dtype.name());
        match self.tiles {
            Tiles::Hopper(t) => {
                let default = match self.kind {
                    KernelKind::HopperFp8 => hopper_fp8_tiles(self.head_dim),
                    _ => hopper_tiles(self.head_dim),
                };
                let mut n = format!("{base}_d{}", self.head_dim);
                if self.score_mod {
                    n.push_str("_mod");
                }
                if default.is_none_or(|d| d.block_n != t.block_n) {
                    n.push_str(&format!("_n{}", t.block_n));
                }
                if default.is_none_or(|d| d.stages != t.stages) {
                    n.push_str(&format!("_s{}", t.stages));
                }
                n
            }
            Tiles::Mma(t) => format!(
                "{base}_d{}_{}x{}w{}",
                self.head_dim, t.block_m, t.block_n, t.warps
            ),
            Tiles::Decode(t) => format!("{base}_d{}_{}x{}", self.head_dim, t.block_n, t.stages),
            Tiles::MmaBwd(t) => format!(
                "{base}_d{}_{}x{}w{}s{}q{}",
                self.head_dim, t.block_m, t.block_n, t.warps, t.stages, t.dq_block_n
            ),
            Tiles::Generic(_) | Tiles::GenericBwd(_) | Tiles::None => base,
        }
    }

    /// The full source NVRTC compiles: the family's files, then the generated checks of
    /// `DecodeParams` (decode families) and `Params` against the Rust structs.
    pub fn source(&self) -> String {
        let mut s = String::new();
        for (_, text) in self.kind.def().sources {
            s.push_str(text);
            s.push('\n');
        }
        if self.kind.def().pass == Pass::Decode {
            s.push_str(&DecodeParams::cuda_layout_checks());
        }
        s.push_str(&KernelParams::cuda_layout_checks());
        s
    }

    /// Entry points of the compiled module.
    pub fn entry_points(&self) -> &'static [&'static str] {
        self.kind.def().entry_points
    }

    /// `-D` options of this variant: every constant the kernel shares with the host.
    pub fn defines(&self) -> Vec<String> {
        let dtype = match self.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Bf16 => 2,
            DType::Fp8E4m3 => 3,
        };
        let mut d = vec![("FA_DTYPE", dtype)];
        match self.tiles {
            Tiles::Hopper(t) => d.extend([
                ("HEAD_DIM", self.head_dim),
                ("BLOCK_M", t.block_m),
                ("BLOCK_N", t.block_n),
                ("STAGES", t.stages),
                ("SCORE_MOD", self.score_mod as usize),
                ("NUM_THREADS", HOPPER_THREADS as usize),
                ("COL_BLOCK", self.col_block()),
            ]),
            Tiles::Mma(t) => d.extend([
                ("HEAD_DIM", self.head_dim),
                ("BLOCK_M", t.block_m),
                ("BLOCK_N", t.block_n),
                ("NUM_WARPS", t.warps),
            ]),
            Tiles::Generic(t) => d.extend([
                ("ROWS_PER_WARP", t.rows_per_warp),
                ("NUM_WARPS", t.warps),
                ("BLOCK_M", t.block_m()),
                ("BLOCK_N", t.block_n),
                ("MAX_HEAD_DIM", MAX_HEAD_DIM),
            ]),
            Tiles::Decode(t) => d.extend([
                ("HEAD_DIM", self.head_dim),
                ("BLOCK_N", t.block_n),
                ("STAGES", t.stages),
                ("NUM_WARPS", DECODE_WARPS),
            ]),
            Tiles::MmaBwd(t) => d.extend([
                ("HEAD_DIM", self.head_dim),
                ("BLOCK_M", t.block_m),
                ("BLOCK_N", t.block_n),
                ("NUM_WARPS", t.warps),
                ("Q_STAGES", t.stages),
                ("DQ_BLOCK_N", t.dq_block_n),
            ]),
            Tiles::GenericBwd(t) => d.extend([
                ("NUM_WARPS", t.warps),
                ("KEYS_PER_WARP", t.keys_per_warp),
                ("MAX_HEAD_DIM", MAX_HEAD_DIM),
            ]),
            Tiles::None => {}
        }
        d.into_iter().map(|(k, v)| format!("-D{k}={v}")).collect()
    }

    /// Elements per 128-byte shared-memory row of the Hopper kernels (the TMA box width).
    fn col_block(&self) -> usize {
        match self.dtype {
            DType::Fp8E4m3 => FP8_BOX_COLS as usize,
            _ => BOX_COLS as usize,
        }
    }

    /// Whether this variant can be built for `arch` (e.g. `sm_90a`).
    pub fn builds_for(&self, arch: &str) -> bool {
        let def = self.kind.def();
        def.only_arch.is_none_or(|a| a == arch) && sm_number(arch).is_some_and(|n| n >= def.min_sm)
    }
}

/// 90 for `sm_90a`, 86 for `sm_86`; `None` for anything else.
pub fn sm_number(arch: &str) -> Option<u32> {
    let digits = arch.strip_prefix("sm_")?.trim_end_matches('a');
    if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The variants that build for `arch`, in a fixed order: what a GPU of that arch may load.
pub fn variants_for_arch(arch: &str) -> Vec<Variant> {
    let mut v = Vec::new();
    for dtype in [DType::Bf16, DType::F16] {
        for d in HOPPER_HEAD_DIMS {
            for score_mod in [false, true] {
                if let Some(t) = hopper_tiles(d) {
                    v.push(Variant::hopper(dtype, d, score_mod, t));
                }
            }
        }
    }
    for d in FP8_HEAD_DIMS {
        for score_mod in [false, true] {
            if score_mod && !fp8_score_mod_builds(d) {
                continue;
            }
            if let Some(t) = hopper_fp8_tiles(d) {
                v.push(Variant::hopper(DType::Fp8E4m3, d, score_mod, t));
            }
        }
    }
    let smem = smem_optin_of_arch(arch);
    for dtype in [DType::Bf16, DType::F16] {
        for d in MMA_HEAD_DIMS {
            if let Ok(t) = mma_tiles(d, smem) {
                v.push(Variant::mma(dtype, d, t));
            }
        }
    }
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        v.push(Variant::generic(dtype));
    }
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        v.push(Variant::naive(dtype));
    }
    // Decode: mma.sync for f16 / bf16, CUDA cores for f32 at every bucket; the CUDA-core
    // kernel on f16 / bf16 (only when forced, for A/B runs) at d128 only, to keep CI short.
    for (kind, dtype, dims) in [
        (KernelKind::DecodeMma, DType::Bf16, &DECODE_HEAD_DIMS[..]),
        (KernelKind::DecodeMma, DType::F16, &DECODE_HEAD_DIMS[..]),
        (KernelKind::DecodeSimt, DType::F32, &DECODE_HEAD_DIMS[..]),
        (KernelKind::DecodeSimt, DType::Bf16, &[128][..]),
        (KernelKind::DecodeSimt, DType::F16, &[128][..]),
    ] {
        for &d in dims {
            if let Ok(t) = decode_tiles(kind, dtype, d, smem) {
                v.push(Variant::decode(kind, dtype, d, t));
            }
        }
    }
    for dtype in [DType::Bf16, DType::F16] {
        for d in MMA_BWD_HEAD_DIMS {
            if let Ok(t) = mma_bwd_tiles(d, smem) {
                v.push(Variant::mma_bwd(dtype, d, t));
            }
        }
    }
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        v.push(Variant::generic_bwd(dtype));
    }
    v.retain(|x| x.builds_for(arch));
    v
}

/// Every variant of every arch in [`CI_ARCHS`], each once.
pub fn all_variants() -> Vec<Variant> {
    let mut all: Vec<Variant> = Vec::new();
    for arch in CI_ARCHS {
        for v in variants_for_arch(arch) {
            if !all.contains(&v) {
                all.push(v);
            }
        }
    }
    all
}

/// The NVRTC target for a device of compute capability `major.minor`: Hopper gets the
/// arch-specific `sm_90a` (wgmma, setmaxnreg), the rest plain `sm_XY`.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiles::check_tiles;

    #[test]
    fn names_are_unique_and_file_safe() {
        let all = all_variants();
        let names: std::collections::HashSet<_> = all.iter().map(|v| v.name()).collect();
        assert_eq!(names.len(), all.len());
        for n in names {
            assert!(
                n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{n}"
            );
        }
        let h = |d, m| Variant::hopper(DType::Bf16, d, m, hopper_tiles(d).unwrap());
        assert_eq!(h(128, false).name(), "hopper_bf16_d128");
        assert_eq!(h(64, true).name(), "hopper_bf16_d64_mod");
        let t = mma_tiles(96, 166_912).unwrap();
        assert_eq!(
            Variant::mma(DType::F16, 96, t).name(),
            "mma_f16_d96_128x64w4"
        );
    }

    #[test]
    fn defines_follow_the_tiles() {
        let v = Variant::hopper(DType::Bf16, 256, true, hopper_tiles(256).unwrap());
        assert_eq!(
            v.defines(),
            [
                "-DFA_DTYPE=2",
                "-DHEAD_DIM=256",
                "-DBLOCK_M=128",
                "-DBLOCK_N=80",
                "-DSTAGES=2",
                "-DSCORE_MOD=1",
                "-DNUM_THREADS=384",
                "-DCOL_BLOCK=64",
            ]
        );
        let v = Variant::mma(DType::F16, 160, mma_tiles(160, 166_912).unwrap());
        assert_eq!(
            v.defines(),
            [
                "-DFA_DTYPE=1",
                "-DHEAD_DIM=160",
                "-DBLOCK_M=128",
                "-DBLOCK_N=64",
                "-DNUM_WARPS=8"
            ]
        );
        assert_eq!(
            Variant::generic(DType::F32).defines(),
            [
                "-DFA_DTYPE=0",
                "-DROWS_PER_WARP=4",
                "-DNUM_WARPS=4",
                "-DBLOCK_M=16",
                "-DBLOCK_N=32",
                "-DMAX_HEAD_DIM=256"
            ]
        );
        assert_eq!(Variant::naive(DType::Bf16).defines(), ["-DFA_DTYPE=2"]);
        // FP8: 128 one-byte elements per 128-byte row.
        let v = Variant::hopper(DType::Fp8E4m3, 256, false, hopper_fp8_tiles(256).unwrap());
        assert_eq!(v.kind, KernelKind::HopperFp8);
        assert_eq!(v.name(), "hopper_fp8_fp8e4m3_d256");
        assert_eq!(
            v.defines(),
            [
                "-DFA_DTYPE=3",
                "-DHEAD_DIM=256",
                "-DBLOCK_M=128",
                "-DBLOCK_N=128",
                "-DSTAGES=2",
                "-DSCORE_MOD=0",
                "-DNUM_THREADS=384",
                "-DCOL_BLOCK=128",
            ]
        );
    }

    #[test]
    fn decode_variants_name_their_tiles_and_check_their_params() {
        let t = decode_tiles(KernelKind::DecodeMma, DType::Bf16, 128, 166_912).unwrap();
        let v = Variant::decode(KernelKind::DecodeMma, DType::Bf16, 128, t);
        assert_eq!(v.name(), "decode_mma_bf16_d128_64x3");
        assert_eq!(
            v.defines(),
            [
                "-DFA_DTYPE=2",
                "-DHEAD_DIM=128",
                "-DBLOCK_N=64",
                "-DSTAGES=3",
                "-DNUM_WARPS=4"
            ]
        );
        let src = v.source();
        assert!(src.contains(&DecodeParams::cuda_layout_checks()));
        assert_eq!(v.entry_points()[DECODE_APPEND_ENTRY], "fa_decode_append");
        assert_eq!(v.entry_points()[DECODE_COMBINE_ENTRY], "fa_decode_combine");
        assert_eq!(KernelKind::DecodeSimt.def().pass, Pass::Decode);
    }

    #[test]
    fn tuned_hopper_tiles_change_name_and_defines() {
        let v = Variant::hopper(
            DType::Bf16,
            128,
            false,
            check_tiles(128, Some(128), None).unwrap(),
        );
        assert_eq!(v.name(), "hopper_bf16_d128_n128");
        assert!(v.defines().contains(&"-DBLOCK_N=128".to_string()));
        let v = Variant::hopper(
            DType::Bf16,
            64,
            false,
            check_tiles(64, Some(176), Some(3)).unwrap(),
        );
        assert_eq!(v.name(), "hopper_bf16_d64_n176_s3");
        assert!(v.defines().contains(&"-DSTAGES=3".to_string()));
    }

    #[test]
    fn arch_selection() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 6), "sm_86");
        assert_eq!(sm_number("sm_90a"), Some(90));
        assert_eq!(sm_number("sm_120"), Some(120));
        assert_eq!(sm_number("compute_90"), None);
        let count = |arch, kind| {
            variants_for_arch(arch)
                .iter()
                .filter(|v| v.kind == kind)
                .count()
        };
        assert_eq!(count("sm_90a", KernelKind::Hopper), 12);
        // FP8: head_dim 128 and 256, score mods at 128 only.
        assert_eq!(count("sm_90a", KernelKind::HopperFp8), 3);
        assert_eq!(count("sm_89", KernelKind::HopperFp8), 0);
        for arch in CI_ARCHS {
            // Every mma bucket fits every CI arch's shared memory, in both dtypes.
            assert_eq!(count(arch, KernelKind::Mma), 16, "{arch}");
            assert_eq!(count(arch, KernelKind::Generic), 3, "{arch}");
        }
        for arch in CI_ARCHS {
            assert_eq!(count(arch, KernelKind::DecodeMma), 6, "{arch}");
            assert_eq!(count(arch, KernelKind::DecodeSimt), 5, "{arch}");
        }
        assert_eq!(
            count("sm_75", KernelKind::DecodeMma),
            0,
            "cp.async needs sm_80"
        );
        assert_eq!(count("sm_80", KernelKind::Hopper), 0);
        assert_eq!(count("sm_75", KernelKind::Mma), 0);
        assert_eq!(count("sm_75", KernelKind::Generic), 3);
        // sm_86 has 99 KiB: the head_dim 256 tiles shrink.
        let d256 = |arch| {
            variants_for_arch(arch)
                .into_iter()
                .find(|v| v.kind == KernelKind::Mma && v.head_dim == 256)
                .unwrap()
                .tiles
        };
        assert_ne!(d256("sm_80"), d256("sm_86"));
    }

    #[test]
    fn sources_hold_their_entry_points_and_the_layout_checks() {
        for v in all_variants() {
            let src = v.source();
            for e in v.entry_points() {
                assert!(src.contains(e), "{} lacks {e}", v.name());
            }
            assert!(!src.contains("#include"), "{} includes a header", v.name());
            assert!(src.ends_with(&KernelParams::cuda_layout_checks()));
        }
        for k in KernelKind::ALL {
            assert_eq!(KernelKind::from_name(k.def().name), Some(k));
        }
        assert_eq!(KernelKind::from_name("MMA"), Some(KernelKind::Mma));
        assert_eq!(KernelKind::from_name("wgmma"), None);
    }
}
