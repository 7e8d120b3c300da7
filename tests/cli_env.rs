//! The environment variables, as every command obeys them: FLASHATTN_BACKEND (an invalid value
//! is an error everywhere), the on/off switches, the cache directory (absolute paths only), and
//! a backend is brought up only when a command needs it, so a CPU run prints no driver noise.

mod common;

use common::cli::{assert_clean_error, assert_clean_success, cli, stderr};
use flashattn::testing::backend_required;

const SMALL: &[&str] = &["--seqlen-q", "40", "--heads", "2", "--head-dim", "16"];

fn wgpu_available() -> bool {
    let out = cli().args(["info", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found = list
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["backend"] == "wgpu" && b["available"] == true);
    if !found {
        assert!(
            !backend_required("wgpu"),
            "wgpu is required but unavailable"
        );
        eprintln!("SKIP the wgpu part: no wgpu adapter here");
    }
    found
}

#[test]
fn an_invalid_setting_is_an_error_in_every_command() {
    for (var, value) in [
        ("FLASHATTN_BACKEND", "tpu"),
        ("FLASHATTN_AUTOTUNE", "maybe"),
        ("FLASHATTN_CANARY", "sometimes"),
    ] {
        let run: Vec<&str> = ["run"].iter().chain(SMALL).copied().collect();
        let bench: Vec<&str> = ["bench", "--iters", "1"]
            .iter()
            .chain(SMALL)
            .copied()
            .collect();
        for cmd in [&["info"][..], &run, &bench] {
            let out = cli().args(cmd).env(var, value).output().unwrap();
            assert_clean_error(&out, &format!("{var} = {value}"));
        }
    }
    let out = cli()
        .arg("run")
        .env("FLASHATTN_BACKEND", "tpu")
        .output()
        .unwrap();
    assert_clean_error(&out, "known: auto, cuda, wgpu, cpu");
}

#[test]
fn flashattn_backend_is_obeyed_by_run_and_bench_and_the_flag_wins() {
    let out = cli()
        .arg("run")
        .args(SMALL)
        .env("FLASHATTN_BACKEND", "cpu")
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert_clean_success(&out);
    let err = stderr(&out);
    assert!(
        err.contains("backend: cpu") && err.contains("forced by FLASHATTN_BACKEND"),
        "{err}"
    );
    assert!(
        !err.contains("bringing up backend wgpu"),
        "wgpu was brought up: {err}"
    );
    assert!(
        !err.contains("bringing up backend cuda"),
        "cuda was brought up: {err}"
    );

    let out = cli()
        .args(["bench", "--warmup", "0", "--iters", "1", "--json"])
        .args(SMALL)
        .env("FLASHATTN_BACKEND", "cpu")
        .output()
        .unwrap();
    assert_clean_success(&out);
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(records[0]["backend"], "cpu");

    if !wgpu_available() {
        return;
    }
    let out = cli()
        .arg("run")
        .args(SMALL)
        .env("FLASHATTN_BACKEND", "wgpu")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("backend: wgpu"), "{}", stderr(&out));
    let out = cli()
        .args(["run", "--backend", "cpu"])
        .args(SMALL)
        .env("FLASHATTN_BACKEND", "wgpu")
        .output()
        .unwrap();
    assert_clean_success(&out);
    assert!(stderr(&out).contains("backend: cpu"), "{}", stderr(&out));
}

#[test]
fn a_relative_or_empty_cache_dir_is_ignored_and_the_canary_records_there() {
    if !wgpu_available() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (work, home) = (root.path().join("work"), root.path().join("home"));
    std::fs::create_dir_all(&work).unwrap();
    for (value, first) in [("relcache", true), ("", false)] {
        let out = cli()
            .args(["run", "--backend", "wgpu", "-v"])
            .args(SMALL)
            .current_dir(&work)
            .env("FLASHATTN_CACHE_DIR", value)
            .env("HOME", &home)
            .env_remove("XDG_CACHE_HOME")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert_eq!(err.contains("canary of wgpu/forward/f32"), first, "{err}");
        assert!(
            !work.join("relcache").exists(),
            "a relative cache dir was used"
        );
        let canary = home.join(".cache/flashattn/canary.json");
        let text = std::fs::read_to_string(&canary).unwrap();
        assert!(text.contains("\"passed\""), "{text}");
    }
}
