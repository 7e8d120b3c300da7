//! The binary under hostile input: absurd sizes are refused before anything is allocated,
//! .npy files are checked against their own size, outputs never overwrite an input or each
//! other and are never left truncated, and a benchmark that timed nothing fails.

mod common;

use common::cli::{assert_clean_error, cli, read_f32, stderr, write_npy};
use std::path::Path;
use std::time::Duration;

#[test]
fn absurd_sizes_are_refused_before_anything_is_allocated() {
    let run = |args: &[&str]| {
        cli()
            .args(args)
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap()
    };
    // 2 TB of random inputs, once an abort in the allocator.
    let out = run(&["run", "--backend", "cpu", "--seqlen-q", "1000000000"]);
    assert_clean_error(&out, "of host memory");
    // Visible pairs of a 1e11 causal problem, once counted one by one.
    let out = run(&[
        "bench",
        "--backend",
        "cpu",
        "--causal",
        "--seqlen-q",
        "100000000000",
    ]);
    assert_clean_error(&out, "of host memory");
    let out = run(&[
        "run",
        "--decode",
        "--cache-len",
        "1000000000",
        "--heads",
        "64",
    ]);
    assert_clean_error(&out, "of host memory");
    let out = run(&["run", "--decode", "--cache-len", "3000000000"]);
    assert_clean_error(&out, "int32");
    let out = run(&["run", "--decode", "--page-size", "0"]);
    assert_clean_error(&out, "--page-size 0");
    let out = run(&["run", "--head-dim", "18446744073709551615", "--decode"]);
    assert_clean_error(&out, "host memory");
    let out = run(&["bench", "--warmup", "18446744073709551615", "--iters", "2"]);
    assert_clean_error(&out, "overflows");
}

/// A .npy file with a version-2 header of `header_len` bytes (claimed) and `body` after it.
fn npy_v2(path: &Path, header_len: u32, body: &[u8]) {
    let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(body);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn npy_headers_and_data_are_checked_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let run = |file: &Path| {
        let f = file.to_str().unwrap();
        cli()
            .args(["run", "--backend", "cpu", "--q", f, "--k", f, "--v", f])
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap()
    };
    npy_v2(&p("huge_header.npy"), u32::MAX, b"{'descr': '<f4'");
    assert_clean_error(&run(&p("huge_header.npy")), "claims 4294967295 bytes");

    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 2, 8), }\n";
    let data = vec![0u8; 4 * 64];
    for (name, len) in [("short.npy", 4 * 63), ("long.npy", 4 * 65)] {
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&data[..len.min(data.len())]);
        body.resize(header.len() + len, 0);
        npy_v2(&p(name), header.len() as u32, &body);
        assert_clean_error(&run(&p(name)), "needs 256 bytes of data");
    }
    let huge =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 2, 2), }\n";
    npy_v2(&p("overflow.npy"), huge.len() as u32, huge.as_bytes());
    assert_clean_error(&run(&p("overflow.npy")), "overflows");
    // The same header with exactly the data its shape needs is read.
    let mut body = header.as_bytes().to_vec();
    body.extend_from_slice(&data);
    npy_v2(&p("ok.npy"), header.len() as u32, &body);
    let out = run(&p("ok.npy"));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// q, k, v files of a small problem in `dir`.
fn small_inputs(dir: &Path) -> [String; 3] {
    let names = ["q.npy", "k.npy", "v.npy"];
    for (i, name) in names.iter().enumerate() {
        let data: Vec<f32> = (0..2 * 5 * 2 * 8)
            .map(|x| ((x * (i + 3)) % 7) as f32 / 7.0)
            .collect();
        write_npy(&dir.join(name), &[2, 5, 2, 8], &data);
    }
    names.map(|n| dir.join(n).to_str().unwrap().to_string())
}

#[test]
fn outputs_never_overwrite_inputs_or_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let [q, k, v] = small_inputs(dir.path());
    let q_bytes = std::fs::read(&q).unwrap();
    let run = |extra: &[&str]| {
        cli()
            .args(["run", "--backend", "cpu", "--q", &q, "--k", &k, "--v", &v])
            .args(extra)
            .output()
            .unwrap()
    };
    assert_clean_error(&run(&["--out", &q]), "is the same file as --q");
    let o = dir.path().join("o.npy");
    let o = o.to_str().unwrap();
    assert_clean_error(&run(&["--out", o, "--lse", o]), "is the same file as --out");
    let through_dots = format!(
        "{}/./../{}/q.npy",
        dir.path().display(),
        dir.path().file_name().unwrap().to_str().unwrap()
    );
    assert_clean_error(&run(&["--lse", &through_dots]), "is the same file as --q");
    #[cfg(unix)]
    {
        let link = dir.path().join("link.npy");
        std::os::unix::fs::symlink(&q, &link).unwrap();
        assert_clean_error(&run(&["--out", link.to_str().unwrap()]), "same file as --q");
        let hard = dir.path().join("hard.npy");
        std::fs::hard_link(&k, &hard).unwrap();
        assert_clean_error(&run(&["--lse", hard.to_str().unwrap()]), "same file as --k");
    }
    assert_eq!(
        std::fs::read(&q).unwrap(),
        q_bytes,
        "the input is untouched"
    );

    // A directory that takes no new file is reported before any work.
    let file = dir.path().join("plain.txt");
    std::fs::write(&file, "x").unwrap();
    let inside = file.join("o.npy");
    let out = run(&["--check", "--out", inside.to_str().unwrap()]);
    assert_clean_error(&out, "does not take a new file");
    assert!(
        !stderr(&out).contains("backend:"),
        "reported after the work"
    );
    let missing = dir.path().join("no/such/dir/o.npy");
    assert_clean_error(&run(&["--out", missing.to_str().unwrap()]), "no/such/dir");

    // A run that fails after its outputs were prepared leaves the old output whole.
    std::fs::write(o, b"previous result").unwrap();
    let slopes = dir.path().join("slopes.npy");
    write_npy(&slopes, &[3], &[0.5f32; 3]);
    let out = run(&["--out", o, "--alibi", slopes.to_str().unwrap()]);
    assert_clean_error(&out, "--alibi");
    assert_eq!(std::fs::read(o).unwrap(), b"previous result");
    let out = run(&["--out", o]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_f32(Path::new(o)).0, vec![2, 5, 2, 8]);
    common::assert_no_tmp_files(dir.path());
}

#[test]
fn a_benchmark_that_timed_nothing_fails() {
    // The CPU backend has no fp8 kernels: every job fails, with or without a plot.
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("t.svg");
    for plot in [false, true] {
        let mut cmd = cli();
        cmd.args([
            "bench",
            "--backend",
            "cpu",
            "--dtype",
            "fp8",
            "--seqlen-q",
            "64",
        ])
        .args(["--warmup", "0", "--iters", "1"]);
        if plot {
            cmd.arg("--plot").arg(&svg);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("nothing was timed"),
            "{}",
            stderr(&out)
        );
    }
    // No plot of nothing.
    assert!(!svg.exists());
}

#[test]
fn flag_combinations_that_mean_nothing_are_refused() {
    let run = |args: &[&str]| cli().args(args).output().unwrap();
    let refused = [
        (&["run", "--decode", "--backward"][..], "--backward"),
        (&["run", "--decode", "--seqlen-k", "9"], "--seqlen-k"),
        (&["run", "--out-dq", "x.npy"], "--backward"),
        (&["run", "--dout", "x.npy"], "--backward"),
        (&["run", "--cache-len", "9"], "--decode"),
        (&["run", "--decode", "--rotary-interleaved"], "--rotary-dim"),
        (
            &[
                "run",
                "--decode",
                "--rotary-dim",
                "8",
                "--rotary-neox",
                "--rotary-interleaved",
            ],
            "--rotary-neox",
        ),
        (&["bench", "--decode", "--compare-naive"], "--compare-naive"),
        (&["bench", "--decode", "--backward"], "--backward"),
        (
            &["bench", "--decode", "--seqlens", "9", "--cache-len", "9"],
            "--cache-len",
        ),
        (&["run", "--decode", "--rotary-dim", "7"], "rotary.dim"),
        (&["run", "--decode", "--rotary-dim", "80"], "rotary.dim"),
    ];
    for (args, fragment) in refused {
        assert_clean_error(&run(args), fragment);
    }
}
