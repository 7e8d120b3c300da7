//! Every kernel variant the backend compiles: which source, which compile-time constants.

use crate::tiles::{hopper_tiles, HOPPER_HEAD_DIMS};
use flashattn_core::DType;

const COMMON: &str = include_str!("../kernels/common.cuh");
const WGMMA: &str = include_str!("../kernels/wgmma.cuh");
const HOPPER: &str = include_str!("../kernels/hopper_fwd.cu");
const GENERIC: &str = include_str!("../kernels/generic_fwd.cu");
const NAIVE: &str = include_str!("../kernels/naive.cu");

/// Which kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// FlashAttention-3-style TMA + wgmma kernel; sm_90a only.
    Hopper,
    /// Portable flash kernel on CUDA cores; any sm_70+ GPU, any shape.
    Generic,
    /// Materialised scores, for benchmarks.
    Naive,
}

/// One compiled unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub kind: KernelKind,
    pub dtype: DType,
    /// Hopper only (the generic kernels take head dims at run time); 0 otherwise.
    pub head_dim: usize,
    /// Hopper only: softcap or ALiBi present (a separate build keeps the plain path lean).
    pub score_mod: bool,
    /// Hopper only: keys per block when not the default of `hopper_tiles` (0 = default).
    pub block_n: usize,
    /// Hopper only: K/V ring depth when not the default (0 = default).
    pub stages: usize,
}

impl Variant {
    pub fn hopper(dtype: DType, head_dim: usize, score_mod: bool) -> Self {
        Variant {
            kind: KernelKind::Hopper,
            dtype,
            head_dim,
            score_mod,
            block_n: 0,
            stages: 0,
        }
    }
    /// This Hopper variant with `block_n` keys per block (for tuning; see `tiles`).
    pub fn with_block_n(mut self, block_n: usize) -> Self {
        self.block_n = block_n;
        self
    }
    /// This Hopper variant with a `stages`-deep K/V ring (for tuning).
    pub fn with_stages(mut self, stages: usize) -> Self {
        self.stages = stages;
        self
    }
    /// The tiles this variant is built with (Hopper only).
    pub fn tiles(&self) -> Option<crate::tiles::HopperTiles> {
        let mut t = hopper_tiles(self.head_dim)?;
        if self.block_n != 0 {
            t.block_n = self.block_n;
        }
        if self.stages != 0 {
            t.stages = self.stages;
        }
        Some(t)
    }
    pub fn generic(dtype: DType) -> Self {
        Variant {
            kind: KernelKind::Generic,
            dtype,
            head_dim: 0,
            score_mod: false,
            block_n: 0,
            stages: 0,
        }
    }
    pub fn naive(dtype: DType) -> Self {
        Variant {
            kind: KernelKind::Naive,
            dtype,
            head_dim: 0,
            score_mod: false,
            block_n: 0,
            stages: 0,
        }
    }

    /// A file-name-safe name, e.g. `hopper_bf16_d128` or `hopper_f16_d64_mod`.
    pub fn name(&self) -> String {
        match self.kind {
            KernelKind::Hopper => format!(
                "hopper_{}_d{}{}{}{}",
                self.dtype.name(),
                self.head_dim,
                if self.score_mod { "_mod" } else { "" },
                if self.block_n != 0 {
                    format!("_n{}", self.block_n)
                } else {
                    String::new()
                },
                if self.stages != 0 {
                    format!("_s{}", self.stages)
                } else {
                    String::new()
                }
            ),
            KernelKind::Generic => format!("generic_{}", self.dtype.name()),
            KernelKind::Naive => format!("naive_{}", self.dtype.name()),
        }
    }

    /// The full source NVRTC compiles (the kernels include no headers).
    pub fn source(&self) -> String {
        match self.kind {
            KernelKind::Hopper => format!("{COMMON}\n{WGMMA}\n{HOPPER}"),
            KernelKind::Generic => format!("{COMMON}\n{GENERIC}"),
            KernelKind::Naive => format!("{COMMON}\n{NAIVE}"),
        }
    }

    /// Entry points of the compiled module.
    pub fn entry_points(&self) -> &'static [&'static str] {
        match self.kind {
            KernelKind::Hopper => &["fa_hopper_fwd"],
            KernelKind::Generic => &["fa_generic_fwd"],
            KernelKind::Naive => &["naive_scores", "naive_softmax_pv"],
        }
    }

    /// `-D` options of this variant.
    pub fn defines(&self) -> Vec<String> {
        let dtype = match self.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Bf16 => 2,
            DType::Fp8E4m3 => 3,
        };
        let mut d = vec![format!("-DFA_DTYPE={dtype}")];
        if self.kind == KernelKind::Hopper {
            if let Some(t) = self.tiles() {
                d.push(format!("-DHEAD_DIM={}", self.head_dim));
                d.push(format!("-DBLOCK_M={}", t.block_m));
                d.push(format!("-DBLOCK_N={}", t.block_n));
                d.push(format!("-DSTAGES={}", t.stages));
                d.push(format!("-DSCORE_MOD={}", self.score_mod as u8));
            }
        }
        d
    }

    /// Whether this variant can be built for `arch` (e.g. `sm_90a`).
    pub fn builds_for(&self, arch: &str) -> bool {
        match self.kind {
            KernelKind::Hopper => arch == "sm_90a",
            _ => true,
        }
    }
}

/// Every variant, in a fixed order.
pub fn all_variants() -> Vec<Variant> {
    let mut v = Vec::new();
    for dtype in [DType::Bf16, DType::F16] {
        for d in HOPPER_HEAD_DIMS {
            for score_mod in [false, true] {
                v.push(Variant::hopper(dtype, d, score_mod));
            }
        }
    }
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        v.push(Variant::generic(dtype));
    }
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        v.push(Variant::naive(dtype));
    }
    v
}

/// The variants that build for `arch`.
pub fn variants_for_arch(arch: &str) -> Vec<Variant> {
    all_variants()
        .into_iter()
        .filter(|v| v.builds_for(arch))
        .collect()
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
        assert_eq!(
            Variant::hopper(DType::Bf16, 128, false).name(),
            "hopper_bf16_d128"
        );
        assert_eq!(
            Variant::hopper(DType::F16, 64, true).name(),
            "hopper_f16_d64_mod"
        );
    }

    #[test]
    fn defines_follow_the_tiles() {
        let d = Variant::hopper(DType::Bf16, 256, true).defines();
        assert_eq!(
            d,
            [
                "-DFA_DTYPE=2",
                "-DHEAD_DIM=256",
                "-DBLOCK_M=128",
                "-DBLOCK_N=80",
                "-DSTAGES=2",
                "-DSCORE_MOD=1"
            ]
        );
        assert_eq!(Variant::generic(DType::F32).defines(), ["-DFA_DTYPE=0"]);
    }

    #[test]
    fn block_n_override_changes_name_and_defines() {
        let v = Variant::hopper(DType::Bf16, 128, false).with_block_n(176);
        assert_eq!(v.name(), "hopper_bf16_d128_n176");
        assert!(v.defines().contains(&"-DBLOCK_N=176".to_string()));
        assert_eq!(v.tiles().unwrap().block_n, 176);
        let v = v.with_stages(3);
        assert_eq!(v.name(), "hopper_bf16_d128_n176_s3");
        assert!(v.defines().contains(&"-DSTAGES=3".to_string()));
    }

    #[test]
    fn arch_selection() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 6), "sm_86");
        assert_eq!(variants_for_arch("sm_90a").len(), all_variants().len());
        assert!(variants_for_arch("sm_80")
            .iter()
            .all(|v| v.kind != KernelKind::Hopper));
    }

    #[test]
    fn sources_hold_their_entry_points() {
        for v in all_variants() {
            let src = v.source();
            for e in v.entry_points() {
                assert!(src.contains(e), "{} lacks {e}", v.name());
            }
            assert!(!src.contains("#include"), "{} includes a header", v.name());
        }
    }
}
