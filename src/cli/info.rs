//! `flashattn info`: what this machine offers (every backend is brought up to say so).

use super::CliResult;
use flashattn::Runtime;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn info(args: InfoArgs) -> CliResult<i32> {
    let runtime = Runtime::from_env().map_err(|e| e.to_string())?;
    if args.json {
        let list: Vec<_> = runtime
            .statuses()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "backend": s.name,
                    "available": s.available,
                    if s.available { "device" } else { "reason" }: s.detail,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?
        );
    } else {
        for s in runtime.statuses() {
            let state = if s.available {
                "available  "
            } else {
                "unavailable"
            };
            println!("{:<5} {state} {}", s.name, s.detail);
        }
        if let Some(name) = &runtime.settings().forced {
            println!("FLASHATTN_BACKEND={name}: every selection uses {name}");
        }
    }
    Ok(0)
}
