//! `flashattn bench`: device-resident timings of one shape or a sweep, for the forward pass,
//! the backward pass (`--backward`) or a decode step (`--decode`), with their peers beside:
//! naive attention (`--compare-naive`), or for decode a copy of the same bytes.

use super::bench_record::{measure, Record};
use super::decode_spec::{CacheArgs, DEFAULT_CACHE_LEN};
use super::outputs::Outputs;
use super::shape::ShapeArgs;
use super::{budget, plot, CliResult};
use flashattn::{Algorithm, AttentionSpec, Backend, BenchPlan, Pass, Runtime};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;

const SWEEP_SEQLENS: &[usize] = &[512, 1024, 2048, 4096, 8192, 16384];
const SWEEP_CACHE_LENS: &[usize] = &[1024, 4096, 16384, 65536];
const SWEEP_HEAD_DIMS: &[usize] = &[64, 128, 256];

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    cache: CacheArgs,
    /// Time the backward pass (TFLOP/s counting it as 2.5 x the forward's FLOPs).
    #[arg(long)]
    backward: bool,
    /// Time one decode step against a KV cache: time per step and GB/s of the K/V rows
    /// attended, beside a copy of the same bytes on the same backend.
    #[arg(long, conflicts_with_all = ["backward", "compare_naive", "seqlen_k"])]
    decode: bool,
    /// Sweep seqlen 512..16384 (decode: cache lengths 1024..65536) and head_dim 64/128/256,
    /// causal off and on (lists below override).
    #[arg(long)]
    sweep: bool,
    /// Sequence lengths to run (seqlen_q = seqlen_k; with --decode the cache lengths),
    /// comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "cache_len")]
    seqlens: Vec<usize>,
    /// Head dimensions to run (head_dim = head_dim_v), comma-separated.
    #[arg(long, value_delimiter = ',')]
    head_dims: Vec<usize>,
    /// Run every shape without and with the causal mask.
    #[arg(long)]
    both_causal: bool,
    /// auto, all (every available backend), or a comma-separated list
    /// [default: FLASHATTN_BACKEND, else auto].
    #[arg(long)]
    backend: Option<String>,
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
    /// Draw throughput against length per backend into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl BenchArgs {
    fn pass(&self) -> Pass {
        match (self.backward, self.decode) {
            (true, _) => Pass::Backward,
            (_, true) => Pass::Decode,
            _ => Pass::Forward,
        }
    }
}

pub fn bench(args: BenchArgs) -> CliResult<i32> {
    if args.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let pass = args.pass();
    let plan = BenchPlan {
        warmup: args.warmup,
        iters: args.iters,
        seed: args.seed,
        pass,
    };
    let runs = plan.runs().map_err(|_| {
        format!(
            "--warmup {} + --iters {} overflows",
            args.warmup, args.iters
        )
    })?;
    let mut outputs = match &args.plot {
        Some(path) => Outputs::prepare(&[("--plot", path)], &[])?,
        None => Outputs::prepare(&[], &[])?,
    };
    let specs = specs(&args)?;
    for spec in &specs {
        let what = format!("the buffers of {spec}");
        budget::check(&what, budget::bench_bytes(spec, pass))?;
    }
    let runtime = Runtime::from_env().map_err(|e| e.to_string())?;
    let jobs = jobs(&runtime, args.backend.as_deref(), &specs, pass)?;
    let peers = 1 + (args.compare_naive || args.decode) as usize;
    let total = runs
        .checked_mul(peers)
        .and_then(|r| r.checked_mul(jobs.len()))
        .ok_or_else(|| {
            format!(
                "--warmup {} + --iters {} overflows",
                args.warmup, args.iters
            )
        })?;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} runs  {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut records = Vec::new();
    for (backend, spec) in &jobs {
        bar.set_message(format!("{} {spec}", backend.name()));
        let b = backend.as_ref();
        let flash = measure(b, spec, Algorithm::Flash, &plan, &bar);
        let naive = args
            .compare_naive
            .then(|| measure(b, spec, Algorithm::Naive, &plan, &bar));
        let copy = args
            .decode
            .then(|| measure(b, spec, Algorithm::Copy, &plan, &bar));
        let record = Record::new(b, spec, pass, flash, naive, copy);
        if !args.json {
            bar.suspend(|| println!("{}", record.table_row()));
        }
        records.push(record);
    }
    bar.finish_and_clear();
    if args.json {
        let text = serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?;
        println!("{text}");
    }
    let timed = records.iter().filter(|r| r.timed()).count();
    if timed == 0 {
        let why = records
            .iter()
            .find_map(|r| r.error.clone())
            .unwrap_or_default();
        eprintln!("error: nothing was timed: {why}");
        return Ok(1);
    }
    if timed < records.len() {
        eprintln!(
            "{} of {} benchmarks failed (see above)",
            records.len() - timed,
            records.len()
        );
    }
    if let Some(path) = &args.plot {
        let svg = plot::svg(&records, pass)?;
        outputs.write_with("--plot", |w| w.write_all(svg.as_bytes()))?;
        if !args.json {
            println!("plot written to {}", path.display());
        }
    }
    Ok(0)
}

fn specs(args: &BenchArgs) -> CliResult<Vec<AttentionSpec>> {
    let pick = |list: &Vec<usize>, sweep: &[usize], one: usize| -> Vec<usize> {
        match (list.is_empty(), args.sweep) {
            (false, _) => list.clone(),
            (true, true) => sweep.to_vec(),
            (true, false) => vec![one],
        }
    };
    let lengths_given = !args.seqlens.is_empty() || args.sweep;
    let (sweep_lengths, one) = if args.decode {
        let one = args.cache.cache_len.unwrap_or(DEFAULT_CACHE_LEN);
        (SWEEP_CACHE_LENS, one)
    } else {
        (SWEEP_SEQLENS, args.shape.seqlen_q.unwrap_or(1024))
    };
    let lengths = pick(&args.seqlens, sweep_lengths, one);
    let head_dims = pick(
        &args.head_dims,
        SWEEP_HEAD_DIMS,
        args.shape.head_dim.unwrap_or(64),
    );
    let causal_modes = if args.both_causal || args.sweep {
        vec![false, true]
    } else {
        vec![args.shape.mask.causal]
    };
    let mut specs = Vec::new();
    for &d in &head_dims {
        for &causal in &causal_modes {
            for &len in &lengths {
                let mut shape = args.shape.clone();
                shape.mask.causal = causal;
                if !args.head_dims.is_empty() || args.sweep {
                    shape.head_dim = Some(d);
                    shape.head_dim_v = Some(d);
                }
                let spec = if args.decode {
                    args.cache.spec(&shape, len)?
                } else {
                    if lengths_given {
                        shape.seqlen_q = Some(len);
                        shape.seqlen_k = Some(len);
                    }
                    shape.to_spec()?
                };
                specs.push(spec);
            }
        }
    }
    Ok(specs)
}

/// (backend, spec) pairs to run, in order. `choice`: `None` follows FLASHATTN_BACKEND,
/// "auto" the runtime's pick, "all" every available backend, else a comma-separated list.
fn jobs(
    runtime: &Runtime,
    choice: Option<&str>,
    specs: &[AttentionSpec],
    pass: Pass,
) -> CliResult<Vec<(Arc<dyn Backend>, AttentionSpec)>> {
    let mut jobs = Vec::new();
    for spec in specs {
        match choice.map(str::trim) {
            None | Some("auto") => {
                let s = runtime
                    .select_with(spec, pass, choice)
                    .map_err(|e| e.to_string())?;
                jobs.push((s.backend, spec.clone()));
            }
            Some("all") => {
                for b in runtime.backends() {
                    jobs.push((b, spec.clone()));
                }
            }
            Some(list) => {
                for name in list.split(',').map(str::trim) {
                    let b = runtime.backend(name).map_err(|e| e.to_string())?;
                    jobs.push((b, spec.clone()));
                }
            }
        }
    }
    Ok(jobs)
}
