//! What the page's form asks for, and the `AttentionSpec` it becomes.

use flashattn_core::{AttentionSpec, DType, Error, Result};
use serde::Deserialize;

/// Largest q (and k, v) buffer the page will allocate, in bytes: a tab that asks for more
/// would likely be killed by the browser before WebGPU could say no.
pub const MAX_INPUT_BYTES: usize = 256 << 20;

/// Largest sequence length the form accepts.
pub const MAX_SEQLEN: usize = 32768;

/// Largest head count the form accepts.
pub const MAX_HEADS: usize = 128;

/// When the page checks the GPU result against the f64 reference (which runs in the page).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckMode {
    /// Only when the reference is cheap enough (see `report::REFERENCE_MAX_FLOPS`).
    #[default]
    Auto,
    Always,
    Never,
}

/// The form's fields. Batch is 1 and the problem is square (seqlen_q = seqlen_k).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    pub seqlen: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// "f32", "f16" or "bf16".
    pub dtype: String,
    pub causal: bool,
    /// Sliding window; -1 is unbounded.
    pub window_left: i64,
    pub window_right: i64,
    /// ALiBi with the standard geometric slopes `2^(-8 (h + 1) / heads)`.
    pub alibi: bool,
    /// 0 is off.
    pub softcap: f32,
    /// Seed of the random inputs.
    pub seed: u64,
    pub check: CheckMode,
    /// The query head whose attention weights the heatmap shows.
    pub heatmap_head: usize,
    /// Timed runs (after one warm-up).
    pub iters: usize,
    /// Also time naive attention (materialised scores) on the same device.
    pub naive: bool,
    /// Also run the backward pass and check dq, dk, dv against the reference backward.
    pub gradients: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seqlen: 256,
            heads: 4,
            head_dim: 64,
            dtype: "f32".into(),
            causal: true,
            window_left: -1,
            window_right: -1,
            alibi: false,
            softcap: 0.0,
            seed: 1,
            check: CheckMode::Auto,
            heatmap_head: 0,
            iters: 5,
            naive: true,
            gradients: true,
        }
    }
}

/// ALiBi slopes as in the ALiBi paper for a power-of-two head count, geometric otherwise.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    (0..heads)
        .map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / heads as f32))
        .collect()
}

impl DemoConfig {
    /// The spec this form describes, validated; the error names the bad field and value.
    pub fn to_spec(&self) -> Result<AttentionSpec> {
        let dtype: DType = self
            .dtype
            .parse()
            .map_err(|e: String| Error::invalid("dtype", &self.dtype, e))?;
        if dtype == DType::Fp8E4m3 {
            return Err(Error::invalid(
                "dtype",
                dtype,
                "fp8 runs on CUDA (Hopper) only; pick f32, f16 or bf16",
            ));
        }
        if self.seqlen > MAX_SEQLEN {
            return Err(Error::invalid(
                "seqlen",
                self.seqlen,
                format!("the demo accepts at most {MAX_SEQLEN}"),
            ));
        }
        if self.heads > MAX_HEADS {
            return Err(Error::invalid(
                "heads",
                self.heads,
                format!("the demo accepts at most {MAX_HEADS}"),
            ));
        }
        if self.iters == 0 || self.iters > 100 {
            return Err(Error::invalid(
                "iters",
                self.iters,
                "must be between 1 and 100",
            ));
        }
        let mut spec = AttentionSpec::new(1, self.heads, self.seqlen, self.seqlen, self.head_dim)
            .dtype(dtype)
            .causal(self.causal)
            .window(self.window_left, self.window_right)
            .softcap(self.softcap)
            .return_lse(true);
        if self.alibi {
            spec = spec.alibi(alibi_slopes(self.heads), false);
        }
        spec.validate()?;
        if self.heatmap_head >= self.heads {
            return Err(Error::invalid(
                "heatmap_head",
                self.heatmap_head,
                format!("must be below heads = {}", self.heads),
            ));
        }
        let bytes = spec
            .q_elems()
            .and_then(|n| n.checked_mul(dtype.size_bytes()))
            .unwrap_or(usize::MAX);
        if bytes > MAX_INPUT_BYTES {
            return Err(Error::invalid(
                "shape",
                spec.shape_string(),
                format!(
                    "q alone would take {} MiB; the demo allows {} MiB per tensor",
                    bytes >> 20,
                    MAX_INPUT_BYTES >> 20
                ),
            ));
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_form_is_a_valid_causal_problem() {
        let spec = DemoConfig::default().to_spec().unwrap();
        assert!(spec.causal && spec.return_lse);
        assert_eq!((spec.seqlen_q, spec.seqlen_k, spec.heads_q), (256, 256, 4));
    }

    #[test]
    fn bad_fields_are_named() {
        // The default form with one change.
        let with = |change: fn(&mut DemoConfig)| {
            let mut c = DemoConfig::default();
            change(&mut c);
            c
        };
        let cases: Vec<(DemoConfig, &str)> = vec![
            (with(|c| c.dtype = "f8".into()), "dtype"),
            (with(|c| c.dtype = "fp8".into()), "dtype"),
            (with(|c| c.seqlen = 0), "seqlen_q"),
            (with(|c| c.head_dim = 300), "head_dim"),
            (with(|c| c.window_left = -2), "window.left"),
            (with(|c| c.softcap = -1.0), "softcap"),
            (with(|c| c.heatmap_head = 4), "heatmap_head"),
            (with(|c| c.seqlen = 40000), "seqlen"),
            (with(|c| c.iters = 0), "iters"),
            (
                with(|c| {
                    c.seqlen = 32768;
                    c.heads = 128;
                    c.head_dim = 256;
                }),
                "shape",
            ),
        ];
        for (cfg, field) in cases {
            match cfg.to_spec() {
                Err(Error::InvalidSpec { field: f, .. }) => assert_eq!(f, field, "{cfg:?}"),
                other => panic!("{cfg:?} gave {other:?}, expected an error on {field}"),
            }
        }
    }

    #[test]
    fn alibi_slopes_follow_the_paper() {
        assert_eq!(
            alibi_slopes(8),
            vec![0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
        );
        let spec = DemoConfig {
            alibi: true,
            ..Default::default()
        }
        .to_spec()
        .unwrap();
        assert_eq!(spec.alibi_slope(0, 3), 2f32.powi(-8));
    }
}
