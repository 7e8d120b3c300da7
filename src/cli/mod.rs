//! Command-line definitions and dispatch.

mod bench;
mod bench_record;
mod budget;
#[cfg(feature = "cuda")]
mod cuda;
mod decode_spec;
mod info;
mod npy;
mod outputs;
mod plot;
mod run;
mod run_backward;
mod run_decode;
mod run_forward;
mod run_inputs;
mod shape;

use clap::{Parser, Subcommand};

/// Errors of the CLI are one line for the user; `String` keeps them simple to compose.
pub type CliResult<T> = Result<T, String>;

#[derive(Parser, Debug)]
#[command(
    name = "flashattn",
    version,
    about = "Fast, memory-efficient, exact attention: inspect, run, check and benchmark"
)]
pub struct Cli {
    /// Log what the runtime decides (backend choice and why).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every backend this build knows, whether it is available here, and if not, why.
    Info(info::InfoArgs),
    /// Run attention (forward, --backward or --decode) on random inputs or .npy files;
    /// optionally check it against the f64 reference.
    Run(run::RunArgs),
    /// Benchmark one shape or a sweep (forward, --backward or --decode): median time,
    /// TFLOP/s or GB/s, extra memory, naive attention or a copy of the same bytes beside.
    Bench(bench::BenchArgs),
    /// CUDA tools: compile every kernel variant ahead of time.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaArgs),
}

/// Runs the command; returns the process exit code. Commands that select backends refuse an
/// invalid environment setting before any work.
pub fn dispatch(cli: Cli) -> CliResult<i32> {
    let env = || flashattn::Settings::from_env().map_err(|e| e.to_string());
    match cli.command {
        Command::Info(a) => env().and_then(|_| info::info(a)),
        Command::Run(a) => env().and_then(|_| run::run(a)),
        Command::Bench(a) => env().and_then(|_| bench::bench(a)),
        #[cfg(feature = "cuda")]
        Command::Cuda(a) => cuda::cuda(a),
    }
}
