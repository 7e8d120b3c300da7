//! `flashattn cuda compile`: every CUDA kernel variant compiled ahead of time with NVRTC.

use super::CliResult;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CudaArgs {
    #[command(subcommand)]
    command: CudaCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CudaCommand {
    /// Compile every kernel variant and write one .cubin per variant (needs NVRTC, no GPU).
    Compile {
        /// Target architecture, e.g. sm_90a.
        #[arg(long, default_value = "sm_90a")]
        arch: String,
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn cuda(args: CudaArgs) -> CliResult<i32> {
    match args.command {
        CudaCommand::Compile { arch, out } => {
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
            let written = flashattn_cuda::compile_all(&arch, &out).map_err(|e| e.to_string())?;
            for path in &written {
                println!("{}", path.display());
            }
            eprintln!("{} variants compiled for {arch}", written.len());
            Ok(0)
        }
    }
}
