//! WGSL sources and their compiled pipelines. A kernel variant is the plain files of shaders/
//! concatenated (see shaders/README.md) after a generated header (enables, tile constants),
//! with `//#if NAME` / `//#else` / `//#endif` line blocks kept where NAME holds (the
//! reduction path, `DECODE` for the decode variant of the flash kernel, `PACKED` for bf16).

use crate::bindings::LayoutKind;
use crate::device::backend_err;
use crate::tiles::{Reduction, Tiles};
use crate::WgpuBackend;
use flashattn_core::{DType, Result};

const PARAMS: &str = include_str!("../../../shaders/params.wgsl");
const MASK: &str = include_str!("../../../shaders/mask.wgsl");
const SCORE_MOD: &str = include_str!("../../../shaders/score_mod.wgsl");
const DTYPE_F32: &str = include_str!("../../../shaders/dtype_f32.wgsl");
const DTYPE_F16: &str = include_str!("../../../shaders/dtype_f16.wgsl");
const DTYPE_BF16: &str = include_str!("../../../shaders/dtype_bf16.wgsl");
const IO_QKV: &str = include_str!("../../../shaders/io_qkv.wgsl");
const IO_FORWARD: &str = include_str!("../../../shaders/io_forward.wgsl");
const ROW_REDUCE: &str = include_str!("../../../shaders/row_reduce.wgsl");
const FLASH: &str = include_str!("../../../shaders/flash_fwd.wgsl");
const COMBINE: &str = include_str!("../../../shaders/combine.wgsl");
const NAIVE: &str = include_str!("../../../shaders/naive.wgsl");
const QUERY_BLOCK: &str = include_str!("../../../shaders/query_block.wgsl");
const IO_BACKWARD: &str = include_str!("../../../shaders/io_backward.wgsl");
const BWD_PREP: &str = include_str!("../../../shaders/bwd_prep.wgsl");
const BWD_DQ: &str = include_str!("../../../shaders/bwd_dq.wgsl");
const BWD_DKDV: &str = include_str!("../../../shaders/bwd_dkdv.wgsl");
const BWD_CAST: &str = include_str!("../../../shaders/bwd_cast.wgsl");
const NAIVE_BWD: &str = include_str!("../../../shaders/naive_bwd.wgsl");
const KV_CACHE: &str = include_str!("../../../shaders/kv_cache.wgsl");
const DECODE_APPEND: &str = include_str!("../../../shaders/decode_append.wgsl");
const SUBGROUP_PROBE: &str = include_str!("../../../shaders/subgroup_probe.wgsl");

/// Which kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Flash(Tiles),
    /// The flash kernel against a KV cache (DECODE: block-table keys, packed GQA rows, rotary q).
    Decode(Tiles),
    /// Decode: writes the new k / v rows into the cache.
    DecodeAppend,
    Combine,
    NaiveScores,
    NaiveSoftmax,
    NaivePv,
    /// Backward: per-row statistics (LSE, delta).
    BwdPrep,
    BwdDq(Tiles),
    BwdDkdv(Tiles),
    /// Backward: an f32 accumulator to the dtype.
    BwdCast,
    NaiveBwd(NaiveBwdStep),
}

/// The entry points of naive_bwd.wgsl, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NaiveBwdStep {
    Probs,
    GradV,
    DScores,
    GradQ,
    GradK,
}

impl NaiveBwdStep {
    pub const ALL: [NaiveBwdStep; 5] = [
        NaiveBwdStep::Probs,
        NaiveBwdStep::GradV,
        NaiveBwdStep::DScores,
        NaiveBwdStep::GradQ,
        NaiveBwdStep::GradK,
    ];
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
            Kernel::Flash(_)
            | Kernel::Decode(_)
            | Kernel::DecodeAppend
            | Kernel::Combine
            | Kernel::BwdPrep
            | Kernel::BwdDq(_)
            | Kernel::BwdDkdv(_)
            | Kernel::BwdCast => "main",
            Kernel::NaiveScores => "scores",
            Kernel::NaiveSoftmax => "softmax",
            Kernel::NaivePv => "pv",
            Kernel::NaiveBwd(step) => match step {
                NaiveBwdStep::Probs => "probs",
                NaiveBwdStep::GradV => "grad_v",
                NaiveBwdStep::DScores => "dscores",
                NaiveBwdStep::GradQ => "grad_q",
                NaiveBwdStep::GradK => "grad_k",
            },
        }
    }

    pub fn layout(&self) -> LayoutKind {
        match self.kernel {
            Kernel::Flash(_)
            | Kernel::Decode(_)
            | Kernel::Combine
            | Kernel::NaiveScores
            | Kernel::NaiveSoftmax
            | Kernel::NaivePv => LayoutKind::Forward,
            Kernel::BwdPrep => LayoutKind::BwdPrep,
            Kernel::BwdDq(_) => LayoutKind::BwdDq,
            Kernel::BwdDkdv(_) => LayoutKind::BwdDkdv,
            Kernel::BwdCast => LayoutKind::BwdCast,
            Kernel::NaiveBwd(_) => LayoutKind::NaiveBwd,
            Kernel::DecodeAppend => LayoutKind::Append,
        }
    }

    fn tiles(&self) -> Option<Tiles> {
        match self.kernel {
            Kernel::Flash(t) | Kernel::Decode(t) | Kernel::BwdDq(t) | Kernel::BwdDkdv(t) => Some(t),
            _ => None,
        }
    }

    /// The kernel's files after params.wgsl, mask.wgsl, score_mod.wgsl and the dtype file.
    fn files(&self) -> &'static [&'static str] {
        match self.kernel {
            Kernel::Flash(_) => &[IO_QKV, IO_FORWARD, ROW_REDUCE, QUERY_BLOCK, FLASH],
            Kernel::Decode(_) => &[IO_QKV, IO_FORWARD, ROW_REDUCE, KV_CACHE, QUERY_BLOCK, FLASH],
            Kernel::DecodeAppend => &[KV_CACHE, DECODE_APPEND],
            Kernel::Combine => &[IO_QKV, IO_FORWARD, COMBINE],
            Kernel::NaiveScores | Kernel::NaiveSoftmax | Kernel::NaivePv => {
                &[IO_QKV, IO_FORWARD, NAIVE]
            }
            Kernel::BwdPrep => &[BWD_PREP],
            Kernel::BwdDq(_) => &[IO_QKV, IO_BACKWARD, ROW_REDUCE, QUERY_BLOCK, BWD_DQ],
            Kernel::BwdDkdv(_) => &[IO_QKV, IO_BACKWARD, ROW_REDUCE, BWD_DKDV],
            Kernel::BwdCast => &[BWD_CAST],
            Kernel::NaiveBwd(_) => &[IO_QKV, IO_BACKWARD, NAIVE_BWD],
        }
    }

    /// The full WGSL source of this variant.
    pub fn source(&self) -> String {
        let dtype_src = match self.dtype {
            DType::F16 => DTYPE_F16,
            DType::Bf16 => DTYPE_BF16,
            _ => DTYPE_F32,
        };
        let reduction = self.tiles().map_or(Reduction::None, |t| t.reduction());
        let mut src = String::new();
        if self.dtype == DType::F16 {
            src.push_str("enable f16;\n");
        }
        if reduction == Reduction::Subgroup {
            src.push_str(SUBGROUPS_ENABLE);
        }
        if let Some(t) = self.tiles() {
            src.push_str(&tile_constants(&t));
        }
        let flags = [
            ("REDUCE_SUBGROUP", reduction == Reduction::Subgroup),
            ("REDUCE_WORKGROUP", reduction == Reduction::Workgroup),
            ("DECODE", matches!(self.kernel, Kernel::Decode(_))),
            ("PACKED", self.dtype == DType::Bf16),
        ];
        for part in [PARAMS, MASK, SCORE_MOD, dtype_src]
            .iter()
            .chain(self.files())
        {
            src.push_str(&preprocess(part, &flags));
            src.push('\n');
        }
        src
    }
}

/// The tile shape as WGSL constants.
fn tile_constants(t: &Tiles) -> String {
    [
        ("WG", t.wg),
        ("TPR", t.tpr),
        ("BLOCK_M", t.block_m),
        ("BLOCK_N", t.block_n),
        ("DS", t.ds),
        ("DVS", t.dvs),
        ("DP", t.dp()),
        ("DVP", t.dvp()),
        ("KVW", t.kvw()),
    ]
    .iter()
    .map(|(name, value)| format!("const {name}: u32 = {value}u;\n"))
    .collect()
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

impl WgpuBackend {
    /// The compiled pipeline of `variant` (compiled once, then cached).
    pub(crate) fn pipeline(&self, variant: Variant) -> Result<wgpu::ComputePipeline> {
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| backend_err("pipeline cache poisoned"))?;
        if let Some(p) = cache.get(&variant) {
            return Ok(p.clone());
        }
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("flashattn"),
                source: wgpu::ShaderSource::Wgsl(variant.source().into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("flashattn"),
                layout: Some(self.layouts.pipeline_layout(variant.layout())),
                module: &module,
                entry_point: Some(variant.entry_point()),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[],
                    // Every workgroup word is written before it is read.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        cache.insert(variant, pipeline.clone());
        Ok(pipeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiles::TileLimits;

    #[test]
    fn preprocess_keeps_the_taken_branch() {
        let src = "a\n//#if X\nb\n//#else\nc\n//#endif\n//#if !X\nd\n//#endif\nenable f16;\ne\n";
        assert_eq!(preprocess(src, &[("X", true)]), "a\nb\ne\n");
        assert_eq!(preprocess(src, &[("X", false)]), "a\nc\nd\ne\n");
    }

    /// Every kernel variant the backend can ask for.
    pub(crate) fn all_variants() -> Vec<Variant> {
        let lim = |sg| TileLimits {
            max_invocations: 256,
            workgroup_storage: 16384,
            subgroup_size: sg,
        };
        let mut kernels = vec![
            Kernel::DecodeAppend,
            Kernel::Combine,
            Kernel::NaiveScores,
            Kernel::NaiveSoftmax,
            Kernel::NaivePv,
            Kernel::BwdPrep,
            Kernel::BwdCast,
        ];
        kernels.extend(NaiveBwdStep::ALL.map(Kernel::NaiveBwd));
        for (d, sg) in [(64, 0), (128, 32), (16, 0), (200, 8)] {
            let l = lim(sg);
            kernels.push(Kernel::Flash(Tiles::forward(d, d, 100, &l)));
            kernels.push(Kernel::Decode(Tiles::forward(d, d, 8, &l)));
            kernels.push(Kernel::BwdDq(Tiles::backward_dq(d, d, 100, &l)));
            kernels.push(Kernel::BwdDkdv(Tiles::backward_dkdv(d, d, &l)));
        }
        let mut v = Vec::new();
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            v.extend(kernels.iter().map(|&kernel| Variant { kernel, dtype }));
        }
        v
    }

    #[test]
    fn every_variant_parses_and_validates_with_naga() {
        for v in all_variants() {
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
        let probe = naga::front::wgsl::parse_str(&subgroup_probe_source()).expect("probe parses");
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&probe)
        .expect("probe validates");
    }
}
