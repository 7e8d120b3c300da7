//! `flashattn run`: the forward pass.

use super::run::{finish, finite_or_null, write_out_and_lse, Check, Report, RunArgs};
use super::run_inputs::{InputArgs, Problem};
use super::CliResult;
use flashattn::{lse_max_error, reference_attention, rel_l2_error, ForwardInputs, Pass};
use std::time::Instant;

pub fn run(args: &RunArgs) -> CliResult<i32> {
    let mut outputs = args.outputs()?;
    let problem = load(args, Pass::Forward, args.lse.is_some() || args.check)?;
    let spec = &problem.spec;
    let selection = args.select(spec, Pass::Forward)?;
    let (q, k, v) = (problem.q.as_ref(), problem.k.as_ref(), problem.v.as_ref());
    let start = Instant::now();
    let output = selection
        .backend
        .forward(spec, ForwardInputs { q, k, v })
        .map_err(|e| e.to_string())?;
    let time_ms = start.elapsed().as_secs_f64() * 1e3;
    let out = output.out.to_f32_vec();

    let check = if args.check {
        if !args.json {
            eprintln!("checking against the f64 reference ...");
        }
        let reference = reference_attention(spec, q, k, v).map_err(|e| e.to_string())?;
        let rel_l2 = rel_l2_error(&out, &reference.out);
        let lse_err = output
            .lse
            .as_ref()
            .map_or(f64::INFINITY, |l| lse_max_error(l, &reference.lse));
        let tolerance = spec.dtype.tolerance();
        Some(Check {
            fields: serde_json::json!({
                "rel_l2": finite_or_null(rel_l2),
                "lse_max_abs": finite_or_null(lse_err),
                "tolerance": tolerance,
            }),
            line: format!(
                "relative L2 error {rel_l2:.3e} (tolerance {tolerance:.0e}), LSE max abs error {lse_err:.3e}"
            ),
            passed: rel_l2 <= tolerance && lse_err <= spec.dtype.lse_tolerance(),
        })
    } else {
        None
    };

    let lse = output.lse.as_deref();
    write_out_and_lse(&mut outputs, spec, &out, lse, problem.file_dtype)?;
    let gflop = spec.flops() / 1e9;
    Ok(finish(
        args,
        Report {
            selection: &selection,
            spec,
            pass: Pass::Forward,
            fields: serde_json::json!({"time_ms": time_ms, "gflop": gflop}),
            summary: format!(
                "{spec}: {time_ms:.3} ms host wall time ({gflop:.3} GFLOP, includes transfers)"
            ),
            check,
        },
    ))
}

/// The inputs of `args` for `pass` (read from .npy files or random).
pub fn load(args: &RunArgs, pass: Pass, return_lse: bool) -> CliResult<Problem> {
    Problem::load(&InputArgs {
        shape: &args.shape,
        files: files(args),
        alibi: args.alibi.as_ref(),
        seed: args.seed,
        pass,
        check: args.check,
        return_lse,
    })
}

/// The .npy inputs, when given.
fn files(args: &RunArgs) -> Option<(&std::path::Path, &std::path::Path, &std::path::Path)> {
    match (&args.q, &args.k, &args.v) {
        (Some(q), Some(k), Some(v)) => Some((q, k, v)),
        _ => None,
    }
}
