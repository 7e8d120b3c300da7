//! The emulator harness shared by tests/emulate.rs (forward and backward kernels) and
//! tests/emulate_decode.rs (decode kernels): the C++ compiler, the source of a variant as the
//! emulator compiles it, one compiled driver per variant, and running a driver with a limit.

use flashattn_core::{AttentionSpec, Error, Result};
use flashattn_cuda::Variant;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const EMU_H: &str = include_str!("../emulator/emu.h");
/// Headers the emulator replaces (their inline PTX runs as C++ in emu.h).
const REPLACED: [&str; 2] = ["ptx.cuh", "dtype.cuh"];

pub fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".to_string())
}

/// Whether a C++ compiler works (else the reason, for `backend_or_skip`).
pub fn check_compiler() -> Result<()> {
    let probe = Command::new(cxx()).arg("--version").output();
    if probe.is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    Err(Error::Unavailable {
        backend: "cuda-emulate",
        reason: format!("no C++ compiler ({}; set CXX)", cxx()),
    })
}

/// A fresh folder (tests run in parallel threads).
pub fn work_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "flashattn-emulate-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A fresh subfolder name of `dir` for one run.
pub fn run_dir(dir: &Path) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    dir.join(format!("run{}", N.fetch_add(1, Ordering::Relaxed)))
}

/// emu.h and `variant`'s sources as the emulator compiles them: the PTX headers replaced,
/// params.cuh's fixed-width typedefs dropped for <cstdint>'s.
pub fn emulator_source(variant: &Variant) -> String {
    sources_for_emulator(variant.kind.def().sources)
}

/// emu.h and `sources` (file name, text) as the emulator compiles them.
pub fn sources_for_emulator(sources: &[(&str, &str)]) -> String {
    let mut src = String::from(EMU_H);
    for (file, text) in sources {
        if REPLACED.contains(file) {
            continue;
        }
        for l in text.lines() {
            if !(l.starts_with("typedef unsigned") && l.contains("int")) {
                src.push_str(l);
                src.push('\n');
            }
        }
    }
    src
}

/// Compiled drivers (or the compiler's complaint) per variant name, in one folder.
pub struct Drivers {
    pub dir: PathBuf,
    built: Mutex<HashMap<String, std::result::Result<PathBuf, String>>>,
}

impl Drivers {
    pub fn new() -> Drivers {
        Drivers {
            dir: work_dir(),
            built: Mutex::new(HashMap::new()),
        }
    }

    /// The driver of `variant` built from `source` with `variant`'s defines and `extra` flags.
    pub fn get(&self, variant: &Variant, source: String, extra: &[String]) -> Result<PathBuf> {
        let name = variant.name();
        let mut built = self.built.lock().unwrap();
        let bin = built
            .entry(name.clone())
            .or_insert_with(|| self.compile(variant, &source, extra));
        bin.clone()
            .map_err(|e| Error::backend("cuda-emulate", format!("{name}: {e}")))
    }

    fn compile(
        &self,
        variant: &Variant,
        source: &str,
        extra: &[String],
    ) -> std::result::Result<PathBuf, String> {
        let mut defines = variant.defines();
        defines.extend_from_slice(extra);
        build_binary(&self.dir, &variant.name(), source, &defines)
    }
}

/// Compiles `source` with `defines` into the binary `dir/name`.
pub fn build_binary(
    dir: &Path,
    name: &str,
    source: &str,
    defines: &[String],
) -> std::result::Result<PathBuf, String> {
    let cpp = dir.join(format!("{name}.cpp"));
    let bin = dir.join(name);
    std::fs::write(&cpp, source).map_err(|e| e.to_string())?;
    let out = Command::new(cxx())
        .args(["-std=c++20", "-O1", "-pthread", "-w", "-o"])
        .arg(&bin)
        .arg(&cpp)
        .args(defines)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "does not compile as C++:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

/// Runs `bin` on `dir`, killed after `limit` (a deadlocked emulation must fail, not hang).
pub fn run_with_limit(bin: &Path, dir: &Path, limit: Duration) -> std::result::Result<(), String> {
    let mut child = Command::new(bin)
        .arg(dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut err);
            }
            return Err(format!("emulated kernel failed ({status}): {err}"));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return Err(format!(
                "emulated kernel still running after {limit:?} (deadlock?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `files` and `spec`'s side tables (cu_seqlens, ALiBi slopes) into a fresh run folder
/// of `dir` and runs the driver `bin` (of variant `name`) on it; returns the folder (the caller
/// reads the results, then removes it).
pub fn run_driver(
    dir: &Path,
    bin: &Path,
    name: &str,
    spec: &AttentionSpec,
    files: &[(&str, &[u8])],
) -> Result<PathBuf> {
    let io = |e: std::io::Error| Error::backend("cuda-emulate", e);
    let dir = run_dir(dir);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(io);
    for (file, bytes) in files {
        write(file, bytes)?;
    }
    if let Some(vl) = &spec.varlen {
        write("cu_q.bin", bytemuck::cast_slice(&vl.cu_seqlens_q))?;
        write("cu_k.bin", bytemuck::cast_slice(&vl.cu_seqlens_k))?;
    }
    if let Some(a) = &spec.alibi {
        write("alibi.bin", bytemuck::cast_slice(&a.slopes))?;
    }
    run_with_limit(bin, &dir, Duration::from_secs(600))
        .map_err(|e| Error::backend("cuda-emulate", format!("{name}: {e}")))?;
    Ok(dir)
}
