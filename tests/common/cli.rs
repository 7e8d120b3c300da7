//! Helpers of the tests that run the `flashattn` binary.

use assert_cmd::Command;
use npyz::WriterBuilder;
use std::path::Path;

/// The binary with static backend priority and no FLASHATTN_BACKEND from the caller.
pub fn cli() -> Command {
    let mut c = Command::cargo_bin("flashattn").unwrap();
    c.env("FLASHATTN_AUTOTUNE", "0")
        .env_remove("FLASHATTN_BACKEND")
        .env_remove("FLASHATTN_CANARY")
        .env_remove("RUST_LOG");
    c
}

/// `flashattn bench --backend cpu` with `args` (split at spaces).
pub fn cpu_bench(args: &str) -> Command {
    let mut c = cli();
    c.args(["bench", "--backend", "cpu"])
        .args(args.split_whitespace());
    c
}

/// The binary running `args`, then `flag dir/file` for each of `files`.
pub fn cli_with_files(args: &[&str], dir: &Path, files: &[(&str, &str)]) -> Command {
    let mut c = cli();
    c.args(args);
    for (flag, file) in files {
        c.arg(flag).arg(dir.join(file));
    }
    c
}

pub fn write_npy<T: npyz::Serialize + npyz::AutoSerialize + Copy>(
    path: &Path,
    shape: &[u64],
    data: &[T],
) {
    let mut file = std::fs::File::create(path).unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut file)
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

pub fn read_f32(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let f = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = f.shape().to_vec();
    (shape, f.into_vec::<f32>().unwrap())
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stdout of a run that must succeed (the assertion shows the exit code and stderr).
pub fn ok_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        stderr(out)
    );
    stdout(out)
}

/// Stdout of a successful `--json` run, parsed.
pub fn ok_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&ok_stdout(out)).expect("stdout is JSON")
}

/// A successful run whose stderr has no `error:` line.
pub fn assert_clean_success(out: &std::process::Output) {
    let err = stderr(out);
    assert!(out.status.success(), "stderr: {err}");
    assert!(!err.contains("error:"), "a successful run printed: {err}");
}

/// Stderr of a failed run: an `error:` line naming `fragment`, exit 2, no panic.
pub fn assert_clean_error(out: &std::process::Output, fragment: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("error:") && err.contains(fragment),
        "stderr '{err}' should contain '{fragment}'"
    );
    assert!(!err.contains("panicked"), "{err}");
}
