//! Without a GPU: the mma.sync kernel's and the portable kernel's real CUDA source, run on the
//! CPU by a small emulator (tests/emulator/emu.h: one fiber per CUDA thread; ldmatrix,
//! mma.sync and shuffles computed from every lane's operands with the PTX ISA's fragment
//! layouts; cp.async landing at its wait), against the f64 reference through core's test kit.
//! The host side is the backend's own: variant selection (`select_mma` / `select_generic`),
//! `KernelParams` and the launch (`flash_launch`). What this cannot show: speed, races between
//! warps, and the real hardware's instruction semantics beyond the documented layouts.
//! Needs a C++20 compiler (`$CXX`, else `c++`); skips with the reason without one, unless
//! FLASHATTN_REQUIRE_BACKENDS names cuda-emulate.

mod common;

use common::{check_nan, deterministic, mma_cases, named, nan_spec, run, run_backward};
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::testing::{backend_or_skip, check_backend, feature_cases};
use flashattn_core::{
    validate_backward_inputs, validate_inputs, Algorithm, AttentionSpec, Backend, BackwardInputs,
    BenchMeasure, BenchPlan, DType, Error, Grads, Output, Pass, Result, Tensor, TensorRef,
};
use flashattn_cuda::{
    backward_plan, flash_launch, select_generic, select_generic_bwd, select_mma, select_mma_bwd,
    smem_optin_of_arch, KernelKind, Variant,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const EMU_H: &str = include_str!("emulator/emu.h");
const DRIVER: &str = include_str!("emulator/driver.cpp");
/// The backward's driver: runs a backward plan's launches (prep, main, post or dq) in order.
const DRIVER_BWD: &str = include_str!("emulator/driver_bwd.cpp");
/// Headers the emulator replaces (their inline PTX runs as C++ in emu.h).
const REPLACED: [&str; 2] = ["ptx.cuh", "dtype.cuh"];

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".to_string())
}

/// A fresh folder for one emulator (tests run in parallel threads).
fn work_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "flashattn-emulate-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The CUDA backend's kernels on the emulator, as a `Backend` (forward only).
struct Emulated {
    arch: &'static str,
    kind: KernelKind,
    dir: PathBuf,
    /// Compiled driver (or the compiler's complaint) per variant name.
    drivers: Mutex<HashMap<String, std::result::Result<PathBuf, String>>>,
}

impl Emulated {
    /// The emulator for `kind` kernels as an `arch` GPU would choose them, if a C++ compiler works.
    fn new(arch: &'static str, kind: KernelKind) -> Result<Emulated> {
        let probe = Command::new(cxx()).arg("--version").output();
        if !probe.is_ok_and(|o| o.status.success()) {
            return Err(Error::Unavailable {
                backend: "cuda-emulate",
                reason: format!("no C++ compiler ({}; set CXX)", cxx()),
            });
        }
        Ok(Emulated {
            arch,
            kind,
            dir: work_dir(),
            drivers: Mutex::new(HashMap::new()),
        })
    }

    fn variant(&self, spec: &AttentionSpec) -> Result<Variant> {
        let checked = spec.validate()?;
        let smem = smem_optin_of_arch(self.arch);
        let v = match self.kind {
            KernelKind::Mma => select_mma(&checked, (8, 0), smem, None),
            KernelKind::Generic => select_generic(&checked, smem),
            k => Err(format!("{k:?} is not emulated")),
        };
        v.map_err(|e| Error::unsupported("cuda-emulate", e))
    }

    /// The backward family of `kind` (mma.sync, portable) for `spec`, as an `arch` GPU picks it.
    fn backward_variant(&self, spec: &AttentionSpec) -> Result<Variant> {
        let checked = spec.validate()?;
        let v = match self.kind {
            KernelKind::Mma => select_mma_bwd(&checked, (8, 0), smem_optin_of_arch(self.arch)),
            KernelKind::Generic => select_generic_bwd(&checked),
            k => Err(format!("{k:?} has no emulated backward")),
        };
        v.map_err(|e| Error::unsupported("cuda-emulate", e))
    }

    /// The driver binary of `variant`: emu.h, the kernel's sources (the PTX headers replaced,
    /// params.cuh's fixed-width typedefs dropped for <cstdint>'s), the driver's main.
    fn driver(&self, variant: &Variant) -> Result<PathBuf> {
        let name = variant.name();
        let mut drivers = self.drivers.lock().unwrap();
        let built = drivers
            .entry(name.clone())
            .or_insert_with(|| self.compile_driver(variant));
        built
            .clone()
            .map_err(|e| Error::backend("cuda-emulate", format!("{name}: {e}")))
    }

    fn compile_driver(&self, variant: &Variant) -> std::result::Result<PathBuf, String> {
        let name = variant.name();
        let mut src = String::from(EMU_H);
        for (file, text) in variant.kind.def().sources {
            if REPLACED.contains(file) {
                continue;
            }
            let text: String = text
                .lines()
                .filter(|l| !(l.starts_with("typedef unsigned") && l.contains("int")))
                .map(|l| format!("{l}\n"))
                .collect();
            src.push_str(&text);
        }
        let backward = variant.kind.def().pass == Pass::Backward;
        src.push_str(if backward { DRIVER_BWD } else { DRIVER });
        let entries = variant.entry_points();
        let entry_defines = if backward {
            vec![
                format!("-DEMU_MAIN={}", entries[2]),
                format!("-DEMU_DQ={}", entries[3]),
            ]
        } else {
            vec![format!("-DEMU_KERNEL={}", entries[0])]
        };
        let cpp = self.dir.join(format!("{name}.cpp"));
        let bin = self.dir.join(&name);
        std::fs::write(&cpp, src).map_err(|e| e.to_string())?;
        let smem_t = if variant.kind == KernelKind::Generic {
            "float"
        } else {
            "uint8_t"
        };
        let out = Command::new(cxx())
            .args(["-std=c++20", "-O1", "-pthread", "-w", "-o"])
            .arg(&bin)
            .arg(&cpp)
            .args(variant.defines())
            .args(entry_defines)
            .arg(format!("-DEMU_SMEM_T={smem_t}"))
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
}

/// Writes `files` and the spec's side tables (cu_seqlens, ALiBi slopes) into a fresh folder
/// under `dir` and runs the driver `bin` on it; returns the folder (the caller reads the
/// results, then removes it).
fn run_driver(
    dir: &Path,
    bin: &Path,
    variant: &Variant,
    spec: &AttentionSpec,
    files: &[(&str, &[u8])],
) -> Result<PathBuf> {
    let io = |e: std::io::Error| Error::backend("cuda-emulate", e);
    let dir = tempdir_in(dir);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(io);
    for (name, bytes) in files {
        write(name, bytes)?;
    }
    if let Some(vl) = &spec.varlen {
        write("cu_q.bin", bytemuck::cast_slice(&vl.cu_seqlens_q))?;
        write("cu_k.bin", bytemuck::cast_slice(&vl.cu_seqlens_k))?;
    }
    if let Some(a) = &spec.alibi {
        write("alibi.bin", bytemuck::cast_slice(&a.slopes))?;
    }
    run_with_limit(bin, &dir, Duration::from_secs(600))
        .map_err(|e| Error::backend("cuda-emulate", format!("{}: {e}", variant.name())))?;
    Ok(dir)
}

/// Runs `bin` on `dir`, killed after `limit` (a deadlocked emulation must fail, not hang).
fn run_with_limit(bin: &Path, dir: &Path, limit: Duration) -> std::result::Result<(), String> {
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

impl Backend for Emulated {
    fn name(&self) -> &'static str {
        "cuda-emulate"
    }

    fn device(&self) -> String {
        format!("CPU emulation of {} ({:?} kernels)", self.arch, self.kind)
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.variant(spec).map(|_| ())
    }

    fn forward(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        let checked = spec.validate()?;
        validate_inputs(spec, &q, &k, &v)?;
        let variant = self.variant(spec)?;
        let bin = self.driver(&variant)?;
        let (params, launch) = flash_launch(&checked, &variant, 1)?;
        let io = |e: std::io::Error| Error::backend("cuda-emulate", e);
        let out_bytes = checked.sizes.out * spec.dtype.output().size_bytes();
        let lse_floats = if spec.return_lse {
            checked.sizes.lse
        } else {
            0
        };
        let launch_txt = format!(
            "{} {} {} {} {out_bytes} {lse_floats}",
            launch.grid.0, launch.grid.1, launch.grid.2, launch.block
        );
        let files: [(&str, &[u8]); 5] = [
            ("params.bin", bytemuck::bytes_of(&params)),
            ("launch.txt", launch_txt.as_bytes()),
            ("q.bin", q.as_bytes()),
            ("k.bin", k.as_bytes()),
            ("v.bin", v.as_bytes()),
        ];
        let dir = run_driver(&self.dir, &bin, &variant, spec, &files)?;
        let out = Tensor::from_bytes(
            spec.dtype.output(),
            &std::fs::read(dir.join("out.bin")).map_err(io)?,
        )?;
        let lse = spec
            .return_lse
            .then(|| std::fs::read(dir.join("lse.bin")).map(|b| bytemuck::pod_collect_to_vec(&b)))
            .transpose()
            .map_err(io)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Output { out, lse })
    }

    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        self.backward_variant(spec).map(|_| ())
    }

    /// The backend's own launch plan (`backward_plan`) run by the backward driver.
    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        let checked = validate_backward_inputs(spec, &inputs)?;
        let variant = self.backward_variant(spec)?;
        let bin = self.driver(&variant)?;
        let plan = backward_plan(&checked, &variant)?;
        let es = spec.dtype.size_bytes();
        let sizes = &checked.sizes;
        let mut launches = format!(
            "{} {} {} {} {}\n",
            sizes.q * es,
            sizes.k * es,
            sizes.v * es,
            sizes.lse,
            plan.dq_accum
        );
        for (stage, l) in &plan.launches {
            let (x, y, z) = l.grid;
            launches.push_str(&format!("{} {x} {y} {z} {}\n", *stage as u8, l.block));
        }
        let files: [(&str, &[u8]); 8] = [
            ("params.bin", bytemuck::bytes_of(&plan.params)),
            ("launches.txt", launches.as_bytes()),
            ("q.bin", inputs.q.as_bytes()),
            ("k.bin", inputs.k.as_bytes()),
            ("v.bin", inputs.v.as_bytes()),
            ("out.bin", inputs.out.as_bytes()),
            ("lse.bin", bytemuck::cast_slice(inputs.lse)),
            ("dout.bin", inputs.dout.as_bytes()),
        ];
        let dir = run_driver(&self.dir, &bin, &variant, spec, &files)?;
        let io = |e: std::io::Error| Error::backend("cuda-emulate", e);
        let read = |name: &str| -> Result<Tensor> {
            Tensor::from_bytes(spec.dtype, &std::fs::read(dir.join(name)).map_err(io)?)
        };
        let grads = Grads {
            dq: read("dq.bin")?,
            dk: read("dk.bin")?,
            dv: read("dv.bin")?,
        };
        let _ = std::fs::remove_dir_all(&dir);
        Ok(grads)
    }

    fn bench(
        &self,
        _: &AttentionSpec,
        _: Algorithm,
        _: &BenchPlan,
        _: &mut dyn FnMut(),
    ) -> Result<BenchMeasure> {
        Err(Error::unsupported(
            "cuda-emulate",
            "no timings in emulation",
        ))
    }
}

fn tempdir_in(dir: &Path) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    dir.join(format!("run{}", N.fetch_add(1, Ordering::Relaxed)))
}

fn emulated(arch: &'static str, kind: KernelKind) -> Option<Emulated> {
    backend_or_skip("cuda-emulate", || Emulated::new(arch, kind))
}

#[test]
fn mma_kernel_feature_cases_bf16_sm80_tiles() {
    let Some(b) = emulated("sm_80", KernelKind::Mma) else {
        return;
    };
    run(&b, "feature cases", &named(feature_cases(DType::Bf16)), 100);
    run(&b, "mma cases", &mma_cases(DType::Bf16), 200);
}

#[test]
fn mma_kernel_feature_cases_f16_sm86_tiles() {
    let Some(b) = emulated("sm_86", KernelKind::Mma) else {
        return;
    };
    run(&b, "feature cases", &named(feature_cases(DType::F16)), 300);
    run(&b, "mma cases", &mma_cases(DType::F16), 400);
}

#[test]
fn portable_kernel_feature_cases_f32() {
    let Some(b) = emulated("sm_80", KernelKind::Generic) else {
        return;
    };
    run(&b, "feature cases", &named(feature_cases(DType::F32)), 500);
}

#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    for (kind, dtype) in [
        (KernelKind::Mma, DType::Bf16),
        (KernelKind::Generic, DType::F32),
    ] {
        let Some(b) = emulated("sm_80", kind) else {
            return;
        };
        for nan_in_q in [false, true] {
            if let Err(e) = check_nan(&b, &nan_spec(dtype), nan_in_q, true) {
                panic!(
                    "{kind:?} {dtype}, NaN in {}: {e}",
                    if nan_in_q { "q" } else { "k" }
                );
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 10,
        failure_persistence: None,
        ..Default::default()
    })]
    /// Core's random specs (every head dim, GQA, masks, softcap, ALiBi, varlen) on the mma.sync
    /// kernel, as an sm_80 GPU would run them.
    #[test]
    fn mma_kernel_random_specs(
        spec in specs(SpecSpace { max_seqlen: 100, ..SpecSpace::new(&[DType::Bf16, DType::F16]) }),
        seed in proptest::prelude::any::<u64>(),
    ) {
        static B: OnceLock<Option<Emulated>> = OnceLock::new();
        let Some(b) = B.get_or_init(|| emulated("sm_80", KernelKind::Mma)) else {
            return Ok(());
        };
        if let Err(e) = check_backend(b, &spec, seed) {
            proptest::prop_assert!(false, "{}", e);
        }
    }
}

/// The backward on core's feature cases (every mask and score feature, GQA, d_v != d, varlen)
/// and the mma.sync shapes (odd head dims: element-wise copies; every bucket; many blocks), dq
/// by atomics and by the deterministic pass, with sm_80's tiles (64 x 128 keys on 8 warps,
/// double-buffered Q/dO; two warps per key tile at head_dim 256).
#[test]
fn mma_backward_bf16_sm80_tiles() {
    let Some(b) = emulated("sm_80", KernelKind::Mma) else {
        return;
    };
    let features = named(feature_cases(DType::Bf16));
    run_backward(&b, "backward features", &features, 800);
    run_backward(
        &b,
        "backward mma cases, deterministic",
        &deterministic(mma_cases(DType::Bf16)),
        810,
    );
}

/// The same with the smaller tiles of 99 KiB GPUs (sm_86/sm_89: one Q/dO buffer at head_dim
/// 128, 32 x 32 keys at 256), f16.
#[test]
fn mma_backward_f16_sm86_tiles() {
    let Some(b) = emulated("sm_86", KernelKind::Mma) else {
        return;
    };
    run_backward(&b, "backward mma cases", &mma_cases(DType::F16), 820);
    let features = deterministic(named(feature_cases(DType::F16)));
    run_backward(&b, "backward features, deterministic", &features, 830);
}

/// The portable backward (f32 problems), both dq modes.
#[test]
fn portable_backward_f32() {
    let Some(b) = emulated("sm_80", KernelKind::Generic) else {
        return;
    };
    let features = named(feature_cases(DType::F32));
    run_backward(&b, "backward features", &features, 840);
    // Every third case deterministic: the portable kernels emulate slowly (a fiber per lane).
    let det = deterministic(features.into_iter().step_by(3).collect());
    run_backward(&b, "backward features, deterministic", &det, 850);
}
