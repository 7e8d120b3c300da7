//! `flashattn run`: one forward pass, forward + backward (`--backward`) or decode step
//! (`--decode`) on random inputs or .npy files, optionally checked against the f64 reference.

use super::decode_spec::CacheArgs;
use super::outputs::{FileArg, Outputs};
use super::shape::ShapeArgs;
use super::{run_backward, run_decode, run_forward, CliResult};
use flashattn::{AttentionSpec, DType, Pass, Runtime, Selection};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Queries, .npy [batch, seqlen_q, heads, head_dim], f32 or f16 (with --k and --v).
    #[arg(long, requires_all = ["k", "v"])]
    pub q: Option<PathBuf>,
    /// Keys, .npy [batch, seqlen_k, kv_heads, head_dim].
    #[arg(long, requires_all = ["q", "v"])]
    pub k: Option<PathBuf>,
    /// Values, .npy [batch, seqlen_k, kv_heads, head_dim_v].
    #[arg(long, requires_all = ["q", "k"])]
    pub v: Option<PathBuf>,
    /// ALiBi slopes, .npy f32 [heads] or [batch, heads].
    #[arg(long)]
    pub alibi: Option<PathBuf>,
    /// auto, cpu, wgpu or cuda [default: FLASHATTN_BACKEND, else auto].
    #[arg(long)]
    pub backend: Option<String>,
    /// Run the backward pass after the forward: dq, dk, dv of a random (or --dout) output gradient.
    #[arg(long)]
    pub backward: bool,
    /// Gradient of the output for --backward, .npy [batch, seqlen_q, heads, head_dim_v] [default: random].
    #[arg(long, requires = "backward")]
    pub dout: Option<PathBuf>,
    /// One decode step against a random KV cache: append --new-tokens rows, then attend.
    #[arg(long, conflicts_with_all = ["backward", "q", "seqlen_k"])]
    pub decode: bool,
    /// Write the output here (.npy, the input file's dtype; f32 for bf16).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the log-sum-exp here (.npy f32 [batch, heads, seqlen_q]).
    #[arg(long)]
    pub lse: Option<PathBuf>,
    /// With --backward: write dq here (.npy, like q).
    #[arg(long, requires = "backward")]
    pub out_dq: Option<PathBuf>,
    /// With --backward: write dk here (.npy, like k).
    #[arg(long, requires = "backward")]
    pub out_dk: Option<PathBuf>,
    /// With --backward: write dv here (.npy, like v).
    #[arg(long, requires = "backward")]
    pub out_dv: Option<PathBuf>,
    /// Compare with the f64 reference and print the relative L2 errors (exit 1 above tolerance).
    #[arg(long)]
    pub check: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl RunArgs {
    /// The output files asked for, checked against the inputs and each other, each with its
    /// temporary file created: before any work.
    pub fn outputs(&self) -> CliResult<Outputs> {
        // (flag, path, whether the run writes it)
        let files: [(&'static str, &Option<PathBuf>, bool); 10] = [
            ("--out", &self.out, true),
            ("--lse", &self.lse, true),
            ("--out-dq", &self.out_dq, true),
            ("--out-dk", &self.out_dk, true),
            ("--out-dv", &self.out_dv, true),
            ("--q", &self.q, false),
            ("--k", &self.k, false),
            ("--v", &self.v, false),
            ("--alibi", &self.alibi, false),
            ("--dout", &self.dout, false),
        ];
        let given = |written: bool| -> Vec<FileArg<'_>> {
            files
                .iter()
                .filter(|f| f.2 == written)
                .filter_map(|&(flag, p, _)| p.as_deref().map(|p| (flag, p)))
                .collect()
        };
        let (outputs, inputs) = (given(true), given(false));
        Outputs::prepare(&outputs, &inputs)
    }

    /// The backend for `pass` of `spec`: --backend, else FLASHATTN_BACKEND, else measured.
    pub fn select(&self, spec: &AttentionSpec, pass: Pass) -> CliResult<Selection> {
        let runtime = Runtime::from_env().map_err(|e| e.to_string())?;
        let selection = runtime
            .select_with(spec, pass, self.backend.as_deref())
            .map_err(|e| e.to_string())?;
        if !self.json {
            let b = &selection.backend;
            eprintln!(
                "backend: {} on {} ({})",
                b.name(),
                b.device(),
                selection.reason
            );
        }
        Ok(selection)
    }
}

/// A comparison with the reference: its numbers (JSON), one line of text, and the verdict.
pub struct Check {
    pub fields: serde_json::Value,
    pub line: String,
    pub passed: bool,
}

/// What one run did, for the report.
pub struct Report<'a> {
    pub selection: &'a Selection,
    pub spec: &'a AttentionSpec,
    pub pass: Pass,
    /// Fields of the JSON record beyond backend, device, reason, spec and pass.
    pub fields: serde_json::Value,
    /// The text line.
    pub summary: String,
    pub check: Option<Check>,
}

pub fn run(args: RunArgs) -> CliResult<i32> {
    if args.decode {
        run_decode::run(&args)
    } else if args.backward {
        run_backward::run(&args)
    } else {
        run_forward::run(&args)
    }
}

/// Prints `report` as JSON or text; the exit code: 1 if the check failed, else 0.
pub fn finish(args: &RunArgs, report: Report<'_>) -> i32 {
    let b = &report.selection.backend;
    if args.json {
        let mut record = serde_json::json!({
            "backend": b.name(),
            "device": b.device(),
            "reason": report.selection.reason,
            "spec": report.spec.to_string(),
            "pass": report.pass.name(),
        });
        if let (Some(r), serde_json::Value::Object(extra)) = (record.as_object_mut(), report.fields)
        {
            r.extend(extra);
        }
        if let Some(c) = &report.check {
            let mut check = c.fields.clone();
            check["passed"] = c.passed.into();
            record["check"] = check;
        }
        println!("{record}");
    } else {
        println!("{}", report.summary);
        if let Some(c) = &report.check {
            let verdict = if c.passed { "PASS" } else { "FAIL" };
            println!("check: {}: {verdict}", c.line);
        }
    }
    match report.check {
        Some(Check { passed: false, .. }) => 1,
        _ => 0,
    }
}

/// Writes `--out` (`out` in `file_dtype`) and `--lse`, where asked for, of a forward or decode
/// output: out `[batch, seqlen_q, heads, head_dim_v]`, LSE f32 `[batch, heads, seqlen_q]`.
pub fn write_out_and_lse(
    outputs: &mut Outputs,
    spec: &AttentionSpec,
    out: &[f32],
    lse: Option<&[f32]>,
    file_dtype: DType,
) -> CliResult<()> {
    let (b, sq, h) = (spec.batch, spec.seqlen_q, spec.heads_q);
    outputs.write("--out", &[b, sq, h, spec.head_dim_v], out, file_dtype)?;
    if outputs.wants("--lse") {
        let lse = lse.ok_or("the backend returned no LSE")?;
        outputs.write("--lse", &[b, h, sq], lse, DType::F32)?;
    }
    Ok(())
}

/// A JSON number, or null for infinities and NaN (which JSON cannot hold).
pub fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}
