//! `flashattn bench`: device-resident timings of one shape or a sweep, with naive attention beside.

use super::shape::ShapeArgs;
use super::{plot, CliResult};
use flashattn::{Algorithm, AttentionSpec, Backend, BenchPlan, Pass, Runtime};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

const SWEEP_SEQLENS: &[usize] = &[512, 1024, 2048, 4096, 8192, 16384];
const SWEEP_HEAD_DIMS: &[usize] = &[64, 128, 256];

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    /// Sweep seqlen 512..16384 and head_dim 64/128/256, causal off and on (lists below override).
    #[arg(long)]
    sweep: bool,
    /// Sequence lengths to run (seqlen_q = seqlen_k), comma-separated.
    #[arg(long, value_delimiter = ',')]
    seqlens: Vec<usize>,
    /// Head dimensions to run (head_dim = head_dim_v), comma-separated.
    #[arg(long, value_delimiter = ',')]
    head_dims: Vec<usize>,
    /// Run every shape without and with the causal mask.
    #[arg(long)]
    both_causal: bool,
    /// auto (the runtime's pick), all (every available backend), or a comma-separated list.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Also run naive attention (materialised scores) on the same backend.
    #[arg(long)]
    compare_naive: bool,
    /// Print the records as a JSON list instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw TFLOP/s against seqlen per backend into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub dtype: String,
    pub causal: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct Measured {
    pub time_ms: Option<f64>,
    pub tflops: Option<f64>,
    pub extra_bytes: Option<u64>,
    pub error: Option<String>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Record {
    pub backend: String,
    pub device: String,
    pub spec: String,
    pub shape: Shape,
    pub time_ms: Option<f64>,
    pub tflops: Option<f64>,
    pub extra_bytes: Option<u64>,
    pub error: Option<String>,
    pub naive: Option<Measured>,
}

pub fn bench(args: BenchArgs) -> CliResult<i32> {
    if args.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let specs = specs(&args)?;
    let runtime = Runtime::new();
    let jobs = jobs(&runtime, &args.backend, &specs)?;
    let plan = BenchPlan {
        warmup: args.warmup,
        iters: args.iters,
        seed: args.seed,
        pass: Pass::Forward,
    };
    let runs_per_job = (plan.warmup + plan.iters) as u64 * if args.compare_naive { 2 } else { 1 };
    let bar = ProgressBar::new(runs_per_job * jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} runs  {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut records = Vec::new();
    for (backend, spec) in &jobs {
        bar.set_message(format!("{} {spec}", backend.name()));
        let flash = measure(backend.as_ref(), spec, Algorithm::Flash, &plan, &bar);
        let naive = args
            .compare_naive
            .then(|| measure(backend.as_ref(), spec, Algorithm::Naive, &plan, &bar));
        let record = Record {
            backend: backend.name().to_string(),
            device: backend.device(),
            spec: spec.to_string(),
            shape: shape_of(spec),
            time_ms: flash.time_ms,
            tflops: flash.tflops,
            extra_bytes: flash.extra_bytes,
            error: flash.error,
            naive,
        };
        if !args.json {
            bar.suspend(|| println!("{}", table_row(&record)));
        }
        records.push(record);
    }
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?
        );
    }
    if let Some(path) = &args.plot {
        plot::tflops_vs_seqlen(path, &records)?;
        if !args.json {
            println!("plot written to {}", path.display());
        }
    }
    let failed = records.iter().all(|r| r.error.is_some());
    Ok(if failed { 1 } else { 0 })
}

fn specs(args: &BenchArgs) -> CliResult<Vec<AttentionSpec>> {
    let base = args.shape.to_spec()?;
    let pick = |list: &Vec<usize>, sweep: &[usize], one: usize| -> Vec<usize> {
        match (list.is_empty(), args.sweep) {
            (false, _) => list.clone(),
            (true, true) => sweep.to_vec(),
            (true, false) => vec![one],
        }
    };
    let explicit_lengths = !args.seqlens.is_empty() || args.sweep;
    let seqlens = pick(&args.seqlens, SWEEP_SEQLENS, base.seqlen_q);
    let head_dims = pick(&args.head_dims, SWEEP_HEAD_DIMS, base.head_dim);
    let causal_modes = if args.both_causal || args.sweep {
        vec![false, true]
    } else {
        vec![base.causal]
    };
    let mut specs = Vec::new();
    for &d in &head_dims {
        for &causal in &causal_modes {
            for &s in &seqlens {
                let mut spec = base.clone().causal(causal);
                if explicit_lengths {
                    spec.seqlen_q = s;
                    spec.seqlen_k = s;
                }
                if !args.head_dims.is_empty() || args.sweep {
                    spec.head_dim = d;
                    spec.head_dim_v = d;
                }
                spec.validate().map_err(|e| e.to_string())?;
                specs.push(spec);
            }
        }
    }
    Ok(specs)
}

/// (backend, spec) pairs to run, in order.
fn jobs(
    runtime: &Runtime,
    choice: &str,
    specs: &[AttentionSpec],
) -> CliResult<Vec<(Arc<dyn Backend>, AttentionSpec)>> {
    let mut jobs = Vec::new();
    for spec in specs {
        match choice {
            "auto" => {
                let s = runtime.select(spec).map_err(|e| e.to_string())?;
                jobs.push((s.backend, spec.clone()));
            }
            "all" => {
                for b in runtime.backends() {
                    jobs.push((b.clone(), spec.clone()));
                }
            }
            list => {
                for name in list.split(',').map(str::trim) {
                    let b = runtime.backend(name).map_err(|e| e.to_string())?;
                    jobs.push((b, spec.clone()));
                }
            }
        }
    }
    Ok(jobs)
}

fn measure(
    backend: &dyn Backend,
    spec: &AttentionSpec,
    algo: Algorithm,
    plan: &BenchPlan,
    bar: &ProgressBar,
) -> Measured {
    let result = backend
        .supports(spec)
        .and_then(|_| backend.bench(spec, algo, plan, &mut || bar.inc(1)));
    match result {
        Ok(m) => {
            let time_ms = m.median_ms();
            Measured {
                time_ms,
                tflops: time_ms.map(|t| spec.flops() / (t * 1e-3) / 1e12),
                extra_bytes: m.extra_bytes,
                error: None,
            }
        }
        Err(e) => Measured {
            time_ms: None,
            tflops: None,
            extra_bytes: None,
            error: Some(e.to_string()),
        },
    }
}

fn shape_of(spec: &AttentionSpec) -> Shape {
    Shape {
        batch: spec.batch,
        heads: spec.heads_q,
        kv_heads: spec.heads_kv,
        seqlen_q: spec.seqlen_q,
        seqlen_k: spec.seqlen_k,
        head_dim: spec.head_dim,
        head_dim_v: spec.head_dim_v,
        dtype: spec.dtype.to_string(),
        causal: spec.causal,
    }
}

fn table_row(r: &Record) -> String {
    let mut line = format!("{:<5} {:<44}", r.backend, r.spec);
    match (&r.error, r.time_ms, r.tflops) {
        (Some(e), _, _) => line += &format!(" error: {e}"),
        (None, Some(t), Some(f)) => {
            line += &format!(
                " {t:>10.3} ms {:>9.4} TFLOP/s  extra {}",
                f,
                bytes(r.extra_bytes)
            )
        }
        _ => line += " no timing",
    }
    if let Some(n) = &r.naive {
        match (&n.error, n.time_ms) {
            (Some(e), _) => line += &format!(" | naive error: {e}"),
            (None, Some(t)) => {
                line += &format!(" | naive {t:.3} ms extra {}", bytes(n.extra_bytes));
                if let Some(ours) = r.time_ms {
                    line += &format!(" | {:.2}x faster", t / ours);
                }
                if let (Some(a), Some(b)) = (r.extra_bytes, n.extra_bytes) {
                    line += &format!(", {:.0}x less memory", b as f64 / (a.max(1)) as f64);
                }
            }
            _ => {}
        }
    }
    line
}

fn bytes(b: Option<u64>) -> String {
    match b {
        None => "n/a".into(),
        Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        Some(b) if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        Some(b) => format!("{b} B"),
    }
}
