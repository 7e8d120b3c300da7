//! `flashattn run`: one forward pass on random inputs or .npy files, optionally checked.

use super::shape::ShapeArgs;
use super::{npy, CliResult};
use flashattn::{
    lse_max_error, random_inputs, reference_attention, rel_l2_error, AttentionSpec, DType, Runtime,
    Tensor,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    /// Queries, .npy [batch, seqlen_q, heads, head_dim], f32 or f16 (with --k and --v).
    #[arg(long, requires_all = ["k", "v"])]
    q: Option<PathBuf>,
    /// Keys, .npy [batch, seqlen_k, kv_heads, head_dim].
    #[arg(long, requires_all = ["q", "v"])]
    k: Option<PathBuf>,
    /// Values, .npy [batch, seqlen_k, kv_heads, head_dim_v].
    #[arg(long, requires_all = ["q", "k"])]
    v: Option<PathBuf>,
    /// ALiBi slopes, .npy f32 [heads] or [batch, heads].
    #[arg(long)]
    alibi: Option<PathBuf>,
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Write the output here (.npy, the input file's dtype; f32 for bf16).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the log-sum-exp here (.npy f32 [batch, heads, seqlen_q]).
    #[arg(long)]
    lse: Option<PathBuf>,
    /// Compare with the f64 reference and print the relative L2 error (exit 1 above tolerance).
    #[arg(long)]
    check: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The problem and its inputs, in the compute dtype, plus the dtype files are written in.
struct Problem {
    spec: AttentionSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    file_dtype: DType,
}

pub fn run(args: RunArgs) -> CliResult<i32> {
    let mut problem = match (&args.q, &args.k, &args.v) {
        (Some(q), Some(k), Some(v)) => from_files(&args, q, k, v)?,
        _ => {
            let spec = args.shape.to_spec()?;
            let (q, k, v) = random_inputs(&spec, args.seed);
            let file_dtype = if spec.dtype == DType::F16 {
                DType::F16
            } else {
                DType::F32
            };
            Problem {
                spec,
                q,
                k,
                v,
                file_dtype,
            }
        }
    };
    if let Some(path) = &args.alibi {
        problem.spec = with_alibi(problem.spec, path)?;
    }
    problem.spec.return_lse = args.lse.is_some() || args.check;
    let spec = &problem.spec;
    spec.validate().map_err(|e| e.to_string())?;

    let runtime = Runtime::new();
    let choice = (args.backend != "auto").then_some(args.backend.as_str());
    let selection = runtime
        .select_with(spec, flashattn::Pass::Forward, choice)
        .map_err(|e| e.to_string())?;
    let backend = &selection.backend;
    if !args.json {
        eprintln!(
            "backend: {} on {} ({})",
            backend.name(),
            backend.device(),
            selection.reason
        );
    }
    let start = Instant::now();
    let output = backend
        .forward(
            spec,
            problem.q.as_ref(),
            problem.k.as_ref(),
            problem.v.as_ref(),
        )
        .map_err(|e| e.to_string())?;
    let time_ms = start.elapsed().as_secs_f64() * 1e3;
    let out = output.out.to_f32_vec();

    let mut check = None;
    if args.check {
        if !args.json {
            eprintln!("checking against the f64 reference ...");
        }
        let reference = reference_attention(
            spec,
            problem.q.as_ref(),
            problem.k.as_ref(),
            problem.v.as_ref(),
        )
        .map_err(|e| e.to_string())?;
        let rel_l2 = rel_l2_error(&out, &reference.out);
        let lse_err = output
            .lse
            .as_ref()
            .map_or(f64::INFINITY, |l| lse_max_error(l, &reference.lse));
        let tolerance = spec.dtype.tolerance();
        check = Some((
            rel_l2,
            lse_err,
            tolerance,
            rel_l2 <= tolerance && lse_err <= spec.dtype.lse_tolerance(),
        ));
    }

    let out_shape = [spec.batch, spec.seqlen_q, spec.heads_q, spec.head_dim_v];
    let out_shape: &[usize] = if spec.is_varlen() {
        &out_shape[1..]
    } else {
        &out_shape
    };
    if let Some(path) = &args.out {
        npy::write(path, out_shape, &out, problem.file_dtype)?;
    }
    if let (Some(path), Some(lse)) = (&args.lse, &output.lse) {
        npy::write(
            path,
            &[spec.batch, spec.heads_q, spec.seqlen_q],
            lse,
            DType::F32,
        )?;
    }

    let gflop = spec.flops() / 1e9;
    if args.json {
        let mut record = serde_json::json!({
            "backend": backend.name(),
            "device": backend.device(),
            "reason": selection.reason,
            "spec": spec.to_string(),
            "time_ms": time_ms,
            "gflop": gflop,
        });
        if let Some((rel_l2, lse_err, tol, ok)) = check {
            record["check"] = serde_json::json!({
                "rel_l2": rel_l2, "lse_max_abs": finite_or_null(lse_err), "tolerance": tol, "passed": ok,
            });
        }
        println!("{record}");
    } else {
        println!("{spec}: {time_ms:.3} ms host wall time ({gflop:.3} GFLOP, includes transfers)");
        if let Some((rel_l2, lse_err, tol, ok)) = check {
            let verdict = if ok { "PASS" } else { "FAIL" };
            println!("check: relative L2 error {rel_l2:.3e} (tolerance {tol:.0e}), LSE max abs error {lse_err:.3e}: {verdict}");
        }
    }
    Ok(match check {
        Some((_, _, _, false)) => 1,
        _ => 0,
    })
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

fn from_files(args: &RunArgs, q: &Path, k: &Path, v: &Path) -> CliResult<Problem> {
    let given = args.shape.given_shape_flags();
    if !given.is_empty() {
        return Err(format!(
            "{} cannot be combined with --q/--k/--v: the shape comes from the files",
            given.join(", ")
        ));
    }
    let (q, k, v) = (load4(q, "q")?, load4(k, "k")?, load4(v, "v")?);
    let file_dtype = q.data.dtype();
    for (name, t) in [("k", &k), ("v", &v)] {
        if t.data.dtype() != file_dtype {
            return Err(format!(
                "--{name} is {} but --q is {file_dtype}",
                t.data.dtype()
            ));
        }
    }
    let [b, sq, h, d] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let [kb, sk, hkv, kd] = [k.shape[0], k.shape[1], k.shape[2], k.shape[3]];
    if kb != b || kd != d {
        return Err(format!(
            "--k has shape {:?}, expected [{b}, seqlen_k, kv_heads, {d}] to match --q {:?}",
            k.shape, q.shape
        ));
    }
    if v.shape[0] != b || v.shape[1] != sk || v.shape[2] != hkv {
        return Err(format!(
            "--v has shape {:?}, expected [{b}, {sk}, {hkv}, head_dim_v] to match --k {:?}",
            v.shape, k.shape
        ));
    }
    let dtype = args.shape.dtype.unwrap_or(file_dtype);
    let spec = args
        .shape
        .mask
        .apply(
            AttentionSpec::new(b, h, sq, sk, d)
                .heads_kv(hkv)
                .head_dim_v(v.shape[3])
                .dtype(dtype),
        )
        .build()
        .map_err(|e| e.to_string())?;
    let convert = |t: Tensor| {
        if t.dtype() == dtype {
            t
        } else {
            Tensor::from_f32(dtype, &t.to_f32_vec())
        }
    };
    Ok(Problem {
        spec,
        q: convert(q.data),
        k: convert(k.data),
        v: convert(v.data),
        file_dtype,
    })
}

fn load4(path: &Path, name: &str) -> CliResult<npy::NpyTensor> {
    let t = npy::read(path)?;
    if t.shape.len() != 4 {
        return Err(format!(
            "--{name} {} has shape {:?}; expected 4 dimensions [batch, seqlen, heads, head_dim]",
            path.display(),
            t.shape
        ));
    }
    Ok(t)
}

fn with_alibi(spec: AttentionSpec, path: &Path) -> CliResult<AttentionSpec> {
    let t = npy::read(path)?;
    let per_batch = match t.shape.as_slice() {
        [h] if *h == spec.heads_q => false,
        [b, h] if *b == spec.batch && *h == spec.heads_q => true,
        other => {
            return Err(format!(
                "--alibi {} has shape {other:?}; expected [{}] or [{}, {}]",
                path.display(),
                spec.heads_q,
                spec.batch,
                spec.heads_q
            ))
        }
    };
    Ok(spec.alibi(t.data.to_f32_vec(), per_batch))
}
