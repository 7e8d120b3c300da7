//! The `flashattn` binary: .npy round trips checked against the reference, JSON output, error exits.

mod common;

use common::cli::{
    assert_clean_error, cli, cli_with_files, cpu_bench, ok_json, ok_stdout, read_f32, write_npy,
};
use flashattn::{reference_attention, rel_l2_error, AttentionSpec, DType, Tensor};

#[test]
fn npy_round_trip_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let spec = AttentionSpec::new(2, 4, 17, 29, 40)
        .heads_kv(2)
        .causal(true)
        .alibi(vec![0.5, 0.25, 0.1, 0.05], false);
    let (q, k, v) = flashattn::random_inputs(&spec, 11);
    let p = |n: &str| dir.path().join(n);
    let (q32, k32, v32) = (q.to_f32_vec(), k.to_f32_vec(), v.to_f32_vec());
    write_npy(&p("q.npy"), &[2, 17, 4, 40], &q32);
    write_npy(&p("k.npy"), &[2, 29, 2, 40], &k32);
    write_npy(&p("v.npy"), &[2, 29, 2, 40], &v32);
    write_npy(&p("slopes.npy"), &[4], &[0.5f32, 0.25, 0.1, 0.05]);
    let files = [
        ("--q", "q.npy"),
        ("--k", "k.npy"),
        ("--v", "v.npy"),
        ("--alibi", "slopes.npy"),
        ("--out", "o.npy"),
        ("--lse", "lse.npy"),
    ];
    let args = ["run", "--backend", "cpu", "--causal", "--check"];
    let out = cli_with_files(&args, dir.path(), &files).output().unwrap();
    assert!(ok_stdout(&out).contains("PASS"));
    let reference = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let (shape, o) = read_f32(&p("o.npy"));
    assert_eq!(shape, vec![2, 17, 4, 40]);
    assert!(rel_l2_error(&o, &reference.out) < 1e-4);
    let (shape, lse) = read_f32(&p("lse.npy"));
    assert_eq!(shape, vec![2, 4, 17]);
    assert!(flashattn::lse_max_error(&lse, &reference.lse) < 1e-3);
}

#[test]
fn f16_files_give_f16_output_and_bf16_converts_f32_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let spec = AttentionSpec::new(1, 2, 9, 9, 16).dtype(DType::F16);
    let (q, k, v) = flashattn::random_inputs(&spec, 3);
    for (name, t) in [("q.npy", &q), ("k.npy", &k), ("v.npy", &v)] {
        let Tensor::F16(data) = t else { unreachable!() };
        write_npy(&p(name), &[1, 9, 2, 16], data);
    }
    let run = |extra: &[&str], out: &str| {
        let files = [
            ("--q", "q.npy"),
            ("--k", "k.npy"),
            ("--v", "v.npy"),
            ("--out", out),
        ];
        let args = [&["run", "--backend", "cpu", "--check"], extra].concat();
        cli_with_files(&args, dir.path(), &files).output().unwrap()
    };
    let out = run(&[], "o16.npy");
    ok_stdout(&out);
    let bytes = std::fs::read(p("o16.npy")).unwrap();
    let f = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(f.dtype().descr(), "'<f2'");
    let out = run(&["--dtype", "bf16"], "o_bf16.npy");
    ok_stdout(&out);
}

#[test]
fn json_outputs_parse_and_carry_the_fields() {
    let out = cli().args(["info", "--json"]).output().unwrap();
    let info = ok_json(&out);
    let names: Vec<_> = info
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["cuda", "wgpu", "cpu"]);

    let out = cli()
        .args([
            "run",
            "--backend",
            "cpu",
            "--seqlen-q",
            "33",
            "--heads",
            "2",
            "--head-dim",
            "72",
            "--window",
            "-1,4",
            "--softcap",
            "20",
            "--check",
            "--json",
        ])
        .output()
        .unwrap();
    let run = ok_json(&out);
    assert_eq!(run["check"]["passed"], true);
    assert!(run["check"]["rel_l2"].as_f64().unwrap() < 1e-4);

    let args = "--seqlens 384,512 --heads 2 --warmup 1 --iters 2 --compare-naive --json";
    let out = cpu_bench(args).output().unwrap();
    let records = ok_json(&out);
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 2);
    for r in records {
        assert_eq!(r["backend"], "cpu");
        assert!(r["time_ms"].as_f64().unwrap() > 0.0);
        assert!(r["tflops"].as_f64().unwrap() > 0.0);
        assert!(r["shape"]["seqlen_q"].as_u64().is_some());
        assert!(r["naive"]["time_ms"].as_f64().unwrap() > 0.0);
        // The naive path materialises [1, 2, s, s] f32 scores; ours must need far less.
        let naive = r["naive"]["extra_bytes"].as_u64().unwrap();
        let ours = r["extra_bytes"].as_u64().unwrap();
        let s = r["shape"]["seqlen_q"].as_u64().unwrap();
        assert!(naive >= 2 * s * s * 4, "naive extra {naive}");
        assert!(ours < naive, "ours {ours} naive {naive}");
    }
}

#[test]
fn plot_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("t.svg");
    let args = "--seqlens 32,64 --heads 1 --warmup 0 --iters 1 --plot";
    let out = cpu_bench(args).arg(&svg).output().unwrap();
    ok_stdout(&out);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("cpu d=64"),
        "{}",
        &text[..200.min(text.len())]
    );
}

#[test]
fn bad_input_gives_one_clear_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let run = |args: &[&str]| cli().arg("run").args(args).output().unwrap();
    assert_clean_error(&run(&["--heads", "0"]), "heads_q");
    assert_clean_error(&run(&["--heads", "6", "--kv-heads", "4"]), "heads_kv");
    assert_clean_error(&run(&["--head-dim", "300"]), "head_dim = 300");
    assert_clean_error(&run(&["--scale", "-1"]), "scale");
    assert_clean_error(&run(&["--softcap", "-3"]), "softcap");
    assert_clean_error(&run(&["--window", "-5,0"]), "window.left");
    assert_clean_error(&run(&["--backend", "tpu"]), "unknown backend");
    assert_clean_error(&run(&["--dtype", "f64"]), "unknown dtype");
    assert_clean_error(&run(&["--dtype", "fp8", "--backend", "cpu"]), "cpu");
    assert_clean_error(&run(&["--window", "3"]), "LEFT,RIGHT");

    std::fs::write(p("junk.npy"), b"not a numpy file").unwrap();
    let junk = p("junk.npy");
    let j = junk.to_str().unwrap();
    assert_clean_error(&run(&["--q", j, "--k", j, "--v", j]), "not a valid .npy");
    let missing = p("missing.npy");
    let m = missing.to_str().unwrap();
    assert_clean_error(&run(&["--q", m, "--k", m, "--v", m]), "cannot read");
    write_npy(&p("q3.npy"), &[2, 3, 4], &[0.5f32; 24]);
    let q3 = p("q3.npy");
    let q3 = q3.to_str().unwrap();
    assert_clean_error(&run(&["--q", q3, "--k", q3, "--v", q3]), "4 dimensions");
    write_npy(&p("q.npy"), &[1, 3, 2, 4], &[0.5f32; 24]);
    write_npy(&p("k.npy"), &[1, 3, 2, 8], &[0.5f32; 48]);
    write_npy(&p("i.npy"), &[1, 3, 2, 4], &[1i32; 24]);
    let (q, k, i) = (p("q.npy"), p("k.npy"), p("i.npy"));
    let (q, k, i) = (
        q.to_str().unwrap(),
        k.to_str().unwrap(),
        i.to_str().unwrap(),
    );
    assert_clean_error(&run(&["--q", q, "--k", k, "--v", k]), "--k has shape");
    assert_clean_error(&run(&["--q", i, "--k", i, "--v", i]), "not supported");
    assert_clean_error(
        &run(&["--q", q, "--k", q, "--v", q, "--heads", "2"]),
        "--heads cannot be combined",
    );
    assert_clean_error(
        &run(&["--q", q, "--k", q, "--v", q, "--alibi", q]),
        "--alibi",
    );

    let out = cli().args(["bench", "--iters", "0"]).output().unwrap();
    assert_clean_error(&out, "--iters");
}
