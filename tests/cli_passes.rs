//! The binary's backward and decode modes end to end on the CPU backend: `run --check` against
//! the f64 reference, gradient files checked independently, and `bench` JSON for both passes.

mod common;

use common::cli::{cli, cli_with_files, cpu_bench, ok_json, ok_stdout, read_f32, write_npy};
use flashattn::{random_inputs, random_tensor, reference_backward, rel_l2_error, AttentionSpec};
use rand::SeedableRng;

#[test]
fn run_backward_checks_and_writes_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // GQA, causal with sq > sk (fully masked rows), head_dim_v != head_dim, odd sizes.
    let spec = AttentionSpec::new(1, 4, 37, 29, 40)
        .heads_kv(2)
        .head_dim_v(24)
        .causal(true);
    let (q, k, v) = random_inputs(&spec, 5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let dout = random_tensor(&mut rng, spec.dtype, spec.out_elems().unwrap());
    write_npy(&p("q.npy"), &[1, 37, 4, 40], &q.to_f32_vec());
    write_npy(&p("k.npy"), &[1, 29, 2, 40], &k.to_f32_vec());
    write_npy(&p("v.npy"), &[1, 29, 2, 24], &v.to_f32_vec());
    write_npy(&p("do.npy"), &[1, 37, 4, 24], &dout.to_f32_vec());
    let files = [
        ("--q", "q.npy"),
        ("--k", "k.npy"),
        ("--v", "v.npy"),
        ("--dout", "do.npy"),
        ("--out-dq", "dq.npy"),
        ("--out-dk", "dk.npy"),
        ("--out-dv", "dv.npy"),
    ];
    let args = [
        "run",
        "--backend",
        "cpu",
        "--backward",
        "--causal",
        "--check",
    ];
    let mut cmd = cli_with_files(&args, dir.path(), &files);
    let text = ok_stdout(&cmd.output().unwrap());
    assert!(text.contains("PASS"), "{text}");
    let want =
        reference_backward(&spec, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    for (file, shape, grad) in [
        ("dq.npy", vec![1, 37, 4, 40], &want.dq),
        ("dk.npy", vec![1, 29, 2, 40], &want.dk),
        ("dv.npy", vec![1, 29, 2, 24], &want.dv),
    ] {
        let (got_shape, got) = read_f32(&p(file));
        assert_eq!(got_shape, shape, "{file}");
        let err = rel_l2_error(&got, grad);
        assert!(err < 2e-4, "{file}: relative L2 error {err:.3e}");
    }
}

#[test]
fn run_decode_checks_a_paged_rotary_step() {
    for (page, extra) in [
        ("1", vec!["--rotary-dim", "32", "--rotary-neox"]),
        ("16", vec!["--window", "100,0"]),
    ] {
        let mut cmd = cli();
        cmd.args([
            "run",
            "--backend",
            "cpu",
            "--decode",
            "--check",
            "--json",
            "--heads",
            "8",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
            "--cache-len",
            "1500",
            "--new-tokens",
            "3",
            "--causal",
            "--dtype",
            "bf16",
            "--page-size",
            page,
        ])
        .args(&extra);
        let text = ok_stdout(&cmd.output().unwrap());
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(json["check"]["passed"], true, "{json}");
        assert_eq!(json["check"]["other_rows_unchanged"], true, "{json}");
    }
}

/// The first row of `flashattn bench --backend cpu --json` with `args` (split at spaces).
fn bench_row(args: &str) -> serde_json::Value {
    ok_json(&cpu_bench(args).arg("--json").output().unwrap())[0].clone()
}

#[test]
fn bench_backward_and_decode_report_their_measures() {
    let row = bench_row(
        "--backward --compare-naive --seqlen-q 256 --heads 2 --head-dim 64 --iters 2 --warmup 1",
    );
    assert_eq!(row["pass"], "backward", "{row}");
    assert!(row["time_ms"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["tflops"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["naive"]["time_ms"].as_f64().unwrap() > 0.0, "{row}");
    // Flash keeps O(N) extra memory; naive materialises 2 heads x 256 x 256 scores (and P).
    let (flash, naive) = (
        row["extra_bytes"].as_f64().unwrap(),
        row["naive"]["extra_bytes"].as_f64().unwrap(),
    );
    assert!(naive > 256.0 * 256.0 * 4.0 && flash < naive, "{row}");

    let row = bench_row(
        "--decode --seqlens 2048 --heads 8 --kv-heads 2 --head-dim 128 --dtype bf16 --iters 3",
    );
    assert_eq!(row["pass"], "decode", "{row}");
    assert!(row["gbps"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["copy"]["gbps"].as_f64().unwrap() > 0.0, "{row}");
}

/// `--deterministic` reaches the backward: the check passes and two runs write the same bits.
#[test]
fn run_backward_deterministic_gives_the_same_bits_twice() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let file = dir.path().join(name);
        let mut cmd = cli();
        cmd.args([
            "run",
            "--backend",
            "cpu",
            "--backward",
            "--deterministic",
            "--heads",
            "3",
            "--seqlen-q",
            "17",
            "--seqlen-k",
            "129",
            "--head-dim",
            "40",
            "--causal",
            "--check",
            "--out-dq",
        ]);
        cmd.arg(&file);
        let text = ok_stdout(&cmd.output().unwrap());
        assert!(text.contains("PASS"), "{text}");
        std::fs::read(file).unwrap()
    };
    assert_eq!(run("a.npy"), run("b.npy"));
}
