//! The `flashattn` command: inspect backends, run attention, check it, benchmark it.

mod cli;

use clap::Parser;
use flashattn_core::alloc_meter::MeteredAlloc;

/// Lets the CPU backend's benchmarks measure their extra heap memory.
#[global_allocator]
static ALLOC: MeteredAlloc = MeteredAlloc;

fn main() {
    let args = cli::Cli::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(if args.verbose { "info" } else { "warn" }),
    )
    .format_target(false)
    .init();
    match cli::dispatch(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
