//! Shape and mask flags shared by `run` and `bench`.

use super::CliResult;
use flashattn::{AttentionSpec, DType};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ShapeArgs {
    /// Batch size [default: 1].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Query heads [default: 8].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (GQA/MQA when fewer than --heads) [default: --heads].
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Query sequence length [default: 1024; with --decode: --new-tokens, at least 1].
    #[arg(long)]
    pub seqlen_q: Option<usize>,
    /// Key/value sequence length [default: --seqlen-q].
    #[arg(long)]
    pub seqlen_k: Option<usize>,
    /// Head dimension of q and k [default: 64].
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Head dimension of v and the output [default: --head-dim].
    #[arg(long)]
    pub head_dim_v: Option<usize>,
    /// Element type: f32, f16, bf16 (fp8e4m3 on CUDA) [default: f32, or the files' dtype].
    #[arg(long)]
    pub dtype: Option<DType>,
    #[command(flatten)]
    pub mask: MaskArgs,
}

/// Flags that change the scores (and how the backward sums), not the shapes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MaskArgs {
    /// Causal mask, bottom-right aligned.
    #[arg(long)]
    pub causal: bool,
    /// Sliding window "LEFT,RIGHT" (-1 = unbounded), e.g. 256,0.
    #[arg(long, value_parser = parse_window, allow_hyphen_values = true)]
    pub window: Option<(i64, i64)>,
    /// Softcap C: scores become C*tanh(s/C).
    #[arg(long, allow_negative_numbers = true)]
    pub softcap: Option<f32>,
    /// Softmax scale [default: 1/sqrt(head_dim)].
    #[arg(long, allow_negative_numbers = true)]
    pub scale: Option<f32>,
    /// Backward: sum dq in a fixed order, so reruns give the same bits (CUDA then uses no
    /// atomics; the CPU and wgpu backwards always do this).
    #[arg(long)]
    pub deterministic: bool,
}

impl ShapeArgs {
    /// Names of the shape flags given on the command line (they conflict with .npy inputs).
    pub fn given_shape_flags(&self) -> Vec<&'static str> {
        let flags = [
            ("--batch", self.batch.is_some()),
            ("--heads", self.heads.is_some()),
            ("--kv-heads", self.kv_heads.is_some()),
            ("--seqlen-q", self.seqlen_q.is_some()),
            ("--seqlen-k", self.seqlen_k.is_some()),
            ("--head-dim", self.head_dim.is_some()),
            ("--head-dim-v", self.head_dim_v.is_some()),
        ];
        flags.iter().filter(|f| f.1).map(|f| f.0).collect()
    }

    /// The spec these flags describe, validated.
    pub fn to_spec(&self) -> CliResult<AttentionSpec> {
        let heads = self.heads.unwrap_or(8);
        let seqlen_q = self.seqlen_q.unwrap_or(1024);
        let head_dim = self.head_dim.unwrap_or(64);
        let spec = AttentionSpec::new(
            self.batch.unwrap_or(1),
            heads,
            seqlen_q,
            self.seqlen_k.unwrap_or(seqlen_q),
            head_dim,
        )
        .heads_kv(self.kv_heads.unwrap_or(heads))
        .head_dim_v(self.head_dim_v.unwrap_or(head_dim))
        .dtype(self.dtype.unwrap_or(DType::F32));
        self.mask.apply(spec).build().map_err(|e| e.to_string())
    }
}

impl MaskArgs {
    pub fn apply(&self, mut spec: AttentionSpec) -> AttentionSpec {
        spec = spec.causal(self.causal);
        if let Some((l, r)) = self.window {
            spec = spec.window(l, r);
        }
        if let Some(c) = self.softcap {
            spec = spec.softcap(c);
        }
        if let Some(s) = self.scale {
            spec = spec.scale(s);
        }
        spec.deterministic(self.deterministic)
    }
}

fn parse_window(text: &str) -> Result<(i64, i64), String> {
    let bad = || format!("--window expects LEFT,RIGHT (integers, -1 = unbounded), got '{text}'");
    let (l, r) = text.split_once(',').ok_or_else(bad)?;
    let l = l.trim().parse().map_err(|_| bad())?;
    let r = r.trim().parse().map_err(|_| bad())?;
    Ok((l, r))
}
