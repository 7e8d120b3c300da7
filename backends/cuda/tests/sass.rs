//! Without a GPU: every kernel variant compiles through NVRTC for sm_90a, and its SASS
//! (cuobjdump -sass) shows the Hopper instructions (HGMMA, UTMALDG) and no local-memory
//! spills (LDL/STL). Needs NVRTC and cuobjdump (scripts/install-cuda-wheels.sh); skips with
//! the reason when they are missing, unless FLASHATTN_REQUIRE_BACKENDS names cuda-compile.

use flashattn_core::testing::backend_required;
use flashattn_cuda::{compile, nvrtc_status, variants_for_arch, KernelKind};
use std::path::PathBuf;
use std::process::Command;

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

fn skip_or_fail(reason: &str) {
    if backend_required("cuda-compile") {
        panic!("cuda-compile is required (FLASHATTN_REQUIRE_BACKENDS) but {reason}");
    }
    eprintln!("SKIP: {reason}");
}

fn count(sass: &str, op: &str) -> usize {
    sass.lines()
        .filter(|l| {
            l.split_whitespace().any(|w| {
                w.starts_with(op) && w.trim_start_matches(op).starts_with(['.', ' ']) || w == op
            })
        })
        .count()
}

#[test]
fn every_variant_compiles_with_hopper_instructions_and_no_spills() {
    if let Err(e) = nvrtc_status() {
        return skip_or_fail(&format!("NVRTC is unavailable: {e}"));
    }
    let Some(tool) = cuobjdump() else {
        return skip_or_fail("cuobjdump not found (set FLASHATTN_CUOBJDUMP or put it on PATH)");
    };
    let dir = std::env::temp_dir().join(format!("flashattn-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for v in variants_for_arch("sm_90a") {
        let c = compile(&v, "sm_90a").unwrap_or_else(|e| panic!("{}: {e}", v.name()));
        let path = dir.join(format!("{}.cubin", v.name()));
        std::fs::write(&path, &c.cubin).unwrap();
        let out = Command::new(&tool)
            .arg("-sass")
            .arg(&path)
            .output()
            .expect("run cuobjdump");
        assert!(
            out.status.success(),
            "cuobjdump failed on {}: {}",
            v.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let sass = String::from_utf8_lossy(&out.stdout);
        let (hgmma, utmaldg) = (count(&sass, "HGMMA"), count(&sass, "UTMALDG"));
        let (ldl, stl) = (count(&sass, "LDL"), count(&sass, "STL"));
        println!(
            "{:24} HGMMA {hgmma:3} UTMALDG {utmaldg:3} LDL {ldl} STL {stl}",
            v.name()
        );
        if v.kind == KernelKind::Hopper && (hgmma == 0 || utmaldg == 0) {
            failures.push(format!("{}: HGMMA {hgmma}, UTMALDG {utmaldg}", v.name()));
        }
        if ldl + stl > 0 {
            failures.push(format!(
                "{}: {ldl} LDL / {stl} STL (register spills)",
                v.name()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn counts_only_whole_opcodes() {
    let sass = "  /*0010*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], RZ ;\n  /*0020*/  LDL.64 R2, [R1] ;\n  /*0030*/  MOV R1, R2 ;\n";
    assert_eq!(count(sass, "HGMMA"), 1);
    assert_eq!(count(sass, "LDL"), 1);
    assert_eq!(count(sass, "STL"), 0);
    assert_eq!(count("  LDLX R1 ;", "LDL"), 0);
}
