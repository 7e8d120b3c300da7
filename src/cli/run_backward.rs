//! `flashattn run --backward`: the forward pass (for out and LSE), then the backward pass of
//! a random (or given) output gradient, both on the backend selected for the backward.

use super::run::{finish, finite_or_null, write_out_and_lse, Check, Report, RunArgs};
use super::run_forward::load;
use super::CliResult;
use flashattn::testing::backward_tolerance;
use flashattn::{reference_backward, rel_l2_error, BackwardInputs, ForwardInputs, Pass};
use std::time::Instant;

pub fn run(args: &RunArgs) -> CliResult<i32> {
    let mut outputs = args.outputs()?;
    let problem = load(args, Pass::Backward, true)?;
    let dout = problem.dout(args.dout.as_deref(), args.seed)?;
    let spec = &problem.spec;
    let selection = args.select(spec, Pass::Backward)?;
    let backend = &selection.backend;
    let (q, k, v) = (problem.q.as_ref(), problem.k.as_ref(), problem.v.as_ref());
    let start = Instant::now();
    let fwd = backend
        .forward(spec, ForwardInputs { q, k, v })
        .map_err(|e| e.to_string())?;
    let forward_ms = start.elapsed().as_secs_f64() * 1e3;
    let lse = fwd
        .lse
        .ok_or_else(|| format!("backend {} returned no LSE", backend.name()))?;
    let inputs = BackwardInputs {
        q,
        k,
        v,
        out: fwd.out.as_ref(),
        lse: &lse,
        dout: dout.as_ref(),
    };
    let start = Instant::now();
    let grads = backend.backward(spec, inputs).map_err(|e| e.to_string())?;
    let time_ms = start.elapsed().as_secs_f64() * 1e3;
    let (dq, dk, dv) = (
        grads.dq.to_f32_vec(),
        grads.dk.to_f32_vec(),
        grads.dv.to_f32_vec(),
    );

    let check = if args.check {
        if !args.json {
            eprintln!("checking against the f64 reference backward ...");
        }
        let want = reference_backward(spec, q, k, v, dout.as_ref()).map_err(|e| e.to_string())?;
        let errors = [
            rel_l2_error(&dq, &want.dq),
            rel_l2_error(&dk, &want.dk),
            rel_l2_error(&dv, &want.dv),
        ];
        let tolerance = backward_tolerance(spec.dtype);
        let [eq, ek, ev] = errors;
        Some(Check {
            fields: serde_json::json!({
                "dq_rel_l2": finite_or_null(eq),
                "dk_rel_l2": finite_or_null(ek),
                "dv_rel_l2": finite_or_null(ev),
                "tolerance": tolerance,
            }),
            line: format!(
                "relative L2 error dq {eq:.3e}, dk {ek:.3e}, dv {ev:.3e} (tolerance {tolerance:.0e})"
            ),
            // NaN compares false: it never passes.
            passed: errors.iter().all(|&e| e <= tolerance),
        })
    } else {
        None
    };

    let (b, sq, sk) = (spec.batch, spec.seqlen_q, spec.seqlen_k);
    let (hq, hkv, d, dv_dim) = (spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v);
    let fd = problem.file_dtype;
    write_out_and_lse(&mut outputs, spec, &fwd.out.to_f32_vec(), Some(&lse), fd)?;
    outputs.write("--out-dq", &[b, sq, hq, d], &dq, fd)?;
    outputs.write("--out-dk", &[b, sk, hkv, d], &dk, fd)?;
    outputs.write("--out-dv", &[b, sk, hkv, dv_dim], &dv, fd)?;
    let gflop = spec.backward_flops() / 1e9;
    Ok(finish(
        args,
        Report {
            selection: &selection,
            spec,
            pass: Pass::Backward,
            fields: serde_json::json!({
                "time_ms": time_ms, "forward_ms": forward_ms, "gflop": gflop,
            }),
            summary: format!(
                "{spec}: backward {time_ms:.3} ms, forward {forward_ms:.3} ms host wall time \
                 ({gflop:.3} GFLOP backward = 2.5 x forward, includes transfers)"
            ),
            check,
        },
    ))
}
