//! Command-line definitions and dispatch.

mod bench;
#[cfg(feature = "cuda")]
mod cuda;
mod info;
mod npy;
mod plot;
mod run;
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
    /// Run attention on random inputs or .npy files; optionally check it against the f64 reference.
    Run(run::RunArgs),
    /// Benchmark one shape or a sweep: median time, TFLOP/s, extra memory, naive attention beside.
    Bench(bench::BenchArgs),
    /// CUDA tools: compile every kernel variant ahead of time.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaArgs),
}

/// Runs the command; returns the process exit code.
pub fn dispatch(cli: Cli) -> CliResult<i32> {
    match cli.command {
        Command::Info(a) => info::info(a),
        Command::Run(a) => run::run(a),
        Command::Bench(a) => bench::bench(a),
        #[cfg(feature = "cuda")]
        Command::Cuda(a) => cuda::cuda(a),
    }
}
