//! WGSL sources and their variants: the plain files in shaders/ plus a generated header
//! (enables, tile constants) and `//#if NAME` / `//#else` / `//#endif` line blocks.

use crate::tiles::Tiles;
use flashattn_core::DType;

const COMMON: &str = include_str!("../../../shaders/common.wgsl");
const FLASH: &str = include_str!("../../../shaders/flash_fwd.wgsl");
const COMBINE: &str = include_str!("../../../shaders/combine.wgsl");
const NAIVE: &str = include_str!("../../../shaders/naive.wgsl");
const DTYPE_F32: &str = include_str!("../../../shaders/dtype_f32.wgsl");
const DTYPE_F16: &str = include_str!("../../../shaders/dtype_f16.wgsl");
const DTYPE_BF16: &str = include_str!("../../../shaders/dtype_bf16.wgsl");
const SUBGROUP_PROBE: &str = include_str!("../../../shaders/subgroup_probe.wgsl");

/// Which kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Flash(Tiles),
    Combine,
    NaiveScores,
    NaiveSoftmax,
    NaivePv,
}

/// One compiled pipeline: a kernel for one dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub kernel: Kernel,
    pub dtype: DType,
}

impl Variant {
    pub fn entry_point(&self) -> &'static str {
        match self.kernel {
            Kernel::Flash(_) | Kernel::Combine => "main",
            Kernel::NaiveScores => "scores",
            Kernel::NaiveSoftmax => "softmax",
            Kernel::NaivePv => "pv",
        }
    }

    /// The full WGSL source of this variant.
    pub fn source(&self) -> String {
        let (body, tiles) = match self.kernel {
            Kernel::Flash(t) => (FLASH, Some(t)),
            Kernel::Combine => (COMBINE, None),
            _ => (NAIVE, None),
        };
        let dtype_src = match self.dtype {
            DType::F16 => DTYPE_F16,
            DType::Bf16 => DTYPE_BF16,
            _ => DTYPE_F32,
        };
        let subgroups = tiles.is_some_and(|t| t.subgroups);
        let mut header = String::new();
        if self.dtype == DType::F16 {
            header.push_str("enable f16;\n");
        }
        if subgroups {
            header.push_str(SUBGROUPS_ENABLE);
        }
        if let Some(t) = tiles {
            header.push_str(&format!(
                "const WG: u32 = {}u;\nconst TPR: u32 = {}u;\nconst BR: u32 = {}u;\n\
                 const BC: u32 = {}u;\nconst DS: u32 = {}u;\nconst DVS: u32 = {}u;\n\
                 const DP: u32 = {}u;\nconst DVP: u32 = {}u;\nconst KVW: u32 = {}u;\n",
                t.wg(),
                t.tpr,
                t.br,
                t.bc,
                t.ds,
                t.dvs,
                t.dp(),
                t.dvp(),
                t.kvw()
            ));
        }
        let flags = [("SUBGROUPS", subgroups)];
        let mut src = header;
        for part in [COMMON, dtype_src, body] {
            src.push_str(&preprocess(part, &flags));
            src.push('\n');
        }
        src
    }
}

/// Browsers require `enable subgroups;`; naga (native) has subgroup operations without it
/// and rejects the directive as not yet implemented.
const SUBGROUPS_ENABLE: &str = if cfg!(target_arch = "wasm32") {
    "enable subgroups;\n"
} else {
    ""
};

/// The subgroup probe kernel (see subgroup_probe.wgsl).
pub fn subgroup_probe_source() -> String {
    format!("{SUBGROUPS_ENABLE}{SUBGROUP_PROBE}")
}

/// Keeps the lines of `//#if NAME` / `//#if !NAME` blocks whose condition holds; drops the
/// `enable` lines of included files (the header has them, and they must come first).
pub fn preprocess(src: &str, flags: &[(&str, bool)]) -> String {
    let value = |name: &str| flags.iter().any(|(n, v)| *n == name && *v);
    let mut keep_stack: Vec<bool> = Vec::new();
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let trimmed = line.trim();
        if let Some(cond) = trimmed.strip_prefix("//#if ") {
            let cond = cond.trim();
            let holds = match cond.strip_prefix('!') {
                Some(name) => !value(name.trim()),
                None => value(cond),
            };
            keep_stack.push(holds);
            continue;
        }
        if trimmed == "//#else" {
            if let Some(top) = keep_stack.last_mut() {
                *top = !*top;
            }
            continue;
        }
        if trimmed == "//#endif" {
            keep_stack.pop();
            continue;
        }
        if keep_stack.iter().all(|k| *k) && !trimmed.starts_with("enable ") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_keeps_the_taken_branch() {
        let src = "a\n//#if X\nb\n//#else\nc\n//#endif\n//#if !X\nd\n//#endif\nenable f16;\ne\n";
        assert_eq!(preprocess(src, &[("X", true)]), "a\nb\ne\n");
        assert_eq!(preprocess(src, &[("X", false)]), "a\nc\nd\ne\n");
    }

    #[test]
    fn every_variant_parses_and_validates_with_naga() {
        let tiles = Tiles::choose(64, 64, 100, 256, 16384, 0);
        let tiles_sg = Tiles::choose(128, 64, 100, 256, 16384, 32);
        assert!(tiles_sg.subgroups);
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for kernel in [
                Kernel::Flash(tiles),
                Kernel::Flash(tiles_sg),
                Kernel::Combine,
                Kernel::NaiveScores,
            ] {
                let v = Variant { kernel, dtype };
                let src = v.source();
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{v:?}: {}", e.emit_to_string(&src)));
                naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::all(),
                )
                .validate(&module)
                .unwrap_or_else(|e| panic!("{v:?}: {e:?}"));
            }
        }
        let probe = naga::front::wgsl::parse_str(&subgroup_probe_source()).expect("probe parses");
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&probe)
        .expect("probe validates");
    }
}
