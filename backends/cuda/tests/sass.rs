//! Without a GPU: every kernel variant compiles through NVRTC for every CI arch (sm_80, sm_86,
//! sm_89, sm_90a), and its SASS (cuobjdump -sass) shows the instructions its family exists for
//! (`KernelDef::sass_needs`: HGMMA + UTMALDG for Hopper, HMMA.16816.F32 + LDSM + LDGSTS for
//! mma.sync) and no local-memory spills (LDL/STL). Every source ends with static_asserts of
//! `Params` against `KernelParams`, so a layout mismatch fails here too. Needs NVRTC and
//! cuobjdump (scripts/install-cuda-wheels.sh); skips with the reason when they are missing,
//! unless FLASHATTN_REQUIRE_BACKENDS names cuda-compile.

use flashattn_core::testing::backend_required;
use flashattn_cuda::{
    compile_many, compile_source, compile_threads, nvrtc_options, nvrtc_status, variants_for_arch,
    Variant, CI_ARCHS,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn cuobjdump() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLASHATTN_CUOBJDUMP") {
        return Some(PathBuf::from(p));
    }
    Command::new("cuobjdump")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "cuobjdump".into())
}

/// The tools, or `None` after printing why the test skips (a failure under cuda-compile).
fn tools() -> Option<PathBuf> {
    let reason = match (nvrtc_status(), cuobjdump()) {
        (Ok(_), Some(tool)) => return Some(tool),
        (Err(e), _) => format!("NVRTC is unavailable: {e}"),
        (_, None) => "cuobjdump not found (set FLASHATTN_CUOBJDUMP or put it on PATH)".to_string(),
    };
    if backend_required("cuda-compile") {
        panic!("cuda-compile is required (FLASHATTN_REQUIRE_BACKENDS) but {reason}");
    }
    eprintln!("SKIP: {reason}");
    None
}

/// Lines of `sass` whose opcode is `op` or starts with `op.` (HMMA.16816.F32.BF16 counts as
/// HMMA.16816.F32); `op` may list alternatives, `RED|REDG` (one instruction named per arch).
fn count(sass: &str, op: &str) -> usize {
    let is = |w: &str, op: &str| w == op || w.strip_prefix(op).is_some_and(|r| r.starts_with('.'));
    sass.lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|w| op.split('|').any(|op| is(w, op)))
        })
        .count()
}

fn sass_of(tool: &Path, cubin: &Path) -> Result<String, String> {
    let out = Command::new(tool)
        .arg("-sass")
        .arg(cubin)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Problems of one compiled variant's SASS; prints its instruction counts.
fn check_sass(v: &Variant, arch: &str, sass: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let needs = v.kind.def().sass_needs;
    let counts: Vec<String> = needs
        .iter()
        .chain(&["LDL", "STL"])
        .map(|op| format!("{op} {}", count(sass, op)))
        .collect();
    println!("{arch:7} {:32} {}", v.name(), counts.join("  "));
    for op in needs {
        if count(sass, op) == 0 {
            problems.push(format!("{} on {arch}: no {op}", v.name()));
        }
    }
    let (ldl, stl) = (count(sass, "LDL"), count(sass, "STL"));
    if ldl + stl > 0 {
        problems.push(format!(
            "{} on {arch}: {ldl} LDL / {stl} STL (register spills)",
            v.name()
        ));
    }
    problems
}

#[test]
fn every_variant_compiles_for_every_ci_arch_with_its_instructions_and_no_spills() {
    let Some(tool) = tools() else { return };
    let dir = std::env::temp_dir().join(format!("flashattn-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let threads = compile_threads();
    let start = Instant::now();
    let (mut failures, mut cubins, mut fresh) = (Vec::new(), Vec::new(), 0);
    for arch in CI_ARCHS {
        let variants = variants_for_arch(arch);
        for (v, c) in variants.iter().zip(compile_many(&variants, arch, threads)) {
            match c {
                Ok(c) => {
                    fresh += !c.from_cache as usize;
                    let path = dir.join(format!("{}-{arch}.cubin", v.name()));
                    std::fs::write(&path, &c.cubin).unwrap();
                    cubins.push((*v, arch, path));
                }
                Err(e) => failures.push(format!("{} on {arch}: {e}", v.name())),
            }
        }
    }
    let compiled = start.elapsed().as_secs_f64();
    // cuobjdump takes about a second per cubin: as many at once as compiles.
    let checks: Vec<Vec<String>> = std::thread::scope(|s| {
        let chunk = cubins.len().div_ceil(threads).max(1);
        let handles: Vec<_> = cubins
            .chunks(chunk)
            .map(|part| {
                let tool = &tool;
                s.spawn(move || {
                    part.iter()
                        .flat_map(|(v, arch, path)| match sass_of(tool, path) {
                            Ok(sass) => check_sass(v, arch, &sass),
                            Err(e) => vec![format!("cuobjdump failed on {}: {e}", v.name())],
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    failures.extend(checks.into_iter().flatten());
    println!(
        "{} (variant, arch) pairs, {fresh} compiled (the rest from the cubin cache), on {threads} threads: {compiled:.1} s; SASS checks {:.1} s",
        cubins.len(),
        start.elapsed().as_secs_f64() - compiled
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The generated layout checks can fail: a kernel whose `Params` lacks a member the Rust struct
/// has does not compile.
#[test]
fn a_params_layout_mismatch_fails_to_compile() {
    if tools().is_none() {
        return;
    }
    let v = variants_for_arch("sm_80")[0];
    let good = v.source();
    let opts = nvrtc_options(&v, "sm_80");
    compile_source("layout_ok", &good, &opts).expect("the real source compiles");
    let bad = good.replacen("    int head_major_tiles;", "", 1);
    assert_ne!(bad, good, "params.cuh declares head_major_tiles");
    let err = compile_source("layout_bad", &bad, &opts).unwrap_err();
    assert!(err.to_string().contains("Params"), "{err}");
}

#[test]
fn counts_only_whole_opcodes() {
    let sass = "  /*0010*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], RZ ;\n  /*0020*/  LDL.64 R2, [R1] ;\n  /*0030*/  MOV R1, R2 ;\n  /*0040*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n";
    assert_eq!(count(sass, "HGMMA"), 1);
    assert_eq!(count(sass, "LDL"), 1);
    assert_eq!(count(sass, "STL"), 0);
    assert_eq!(count(sass, "HMMA.16816.F32"), 1);
    assert_eq!(count(sass, "HMMA.16816.F16"), 0);
    assert_eq!(count("  LDLX R1 ;", "LDL"), 0);
    let red = "  RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;\n  REDG.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;\n";
    assert_eq!(count(red, "RED|REDG"), 2);
    assert_eq!(count(red, "RED"), 1);
}
