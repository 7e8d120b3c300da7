//! NVRTC compilation with the on-disk cubin cache, and ahead-of-time `compile_all`.

use crate::cache::{cache_key, cache_root, cubin_path, write_atomic};
use crate::loader::load_nvrtc;
use crate::variants::{variants_for_arch, Variant};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use flashattn_core::{Error, Result};
use std::ffi::CString;
use std::path::{Path, PathBuf};

pub(crate) const BACKEND: &str = "cuda";

/// A compiled variant.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's log (ptxas register and spill report), empty when read from the cache.
    pub log: String,
    pub from_cache: bool,
}

/// NVRTC's (major, minor) version; `Unavailable` when NVRTC cannot be found.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    load_nvrtc().map_err(|reason| Error::Unavailable {
        backend: BACKEND,
        reason,
    })?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::backend(BACKEND, format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

fn check_arch(arch: &str) -> Result<()> {
    let digits = arch.strip_prefix("sm_").map(|s| s.trim_end_matches('a'));
    match digits {
        Some(d) if d.len() >= 2 && d.chars().all(|c| c.is_ascii_digit()) => Ok(()),
        _ => Err(Error::invalid(
            "arch",
            arch,
            "expected sm_XY or sm_XYa, e.g. sm_90a",
        )),
    }
}

/// The NVRTC options for `variant` on `arch`.
pub fn options(variant: &Variant, arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        // exp2/log2 as single MUFU instructions: softmax accuracy stays far inside bf16/f16 tolerance.
        "--use_fast_math".to_string(),
        // ptxas prints registers and spills into the log.
        "--ptxas-options=-v".to_string(),
    ];
    o.extend(variant.defines());
    // Tuning hook for A/B runs of schedule choices (e.g. "-DRESCALE_UNDER_QK=0"); part of the
    // cache key like every option.
    if let Ok(extra) = std::env::var("FLASHATTN_CUDA_EXTRA_DEFINES") {
        o.extend(
            extra
                .split_whitespace()
                .filter(|d| d.starts_with("-D"))
                .map(str::to_string),
        );
    }
    o
}

/// Compiles `variant` for `arch`, through the disk cache.
pub fn compile(variant: &Variant, arch: &str) -> Result<Compiled> {
    check_arch(arch)?;
    if !variant.builds_for(arch) {
        return Err(Error::Unsupported {
            backend: BACKEND,
            reason: format!("kernel {} needs sm_90a, not {arch}", variant.name()),
        });
    }
    let version = nvrtc_version()?;
    let source = variant.source();
    let opts = options(variant, arch);
    let key = cache_key(&source, &opts, arch, version);
    let path = cubin_path(&cache_root(), &variant.name(), arch, key);
    if let Ok(cubin) = std::fs::read(&path) {
        if !cubin.is_empty() {
            return Ok(Compiled {
                cubin,
                log: String::new(),
                from_cache: true,
            });
        }
    }
    let (cubin, log) = compile_uncached(&variant.name(), &source, &opts)?;
    // A cache that cannot be written only costs time: compile again next process.
    let _ = write_atomic(&path, &cubin);
    Ok(Compiled {
        cubin,
        log,
        from_cache: false,
    })
}

fn nvrtc_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::backend(BACKEND, format!("NVRTC {what}: {e:?}"))
}

fn compile_uncached(name: &str, source: &str, opts: &[String]) -> Result<(Vec<u8>, String)> {
    let src = CString::new(source).map_err(|e| nvrtc_err("source", e))?;
    let file = CString::new(format!("{name}.cu")).map_err(|e| nvrtc_err("name", e))?;
    let prog = nvrtc::create_program(&src, Some(&file)).map_err(|e| nvrtc_err("create", e))?;
    // SAFETY: `prog` is live until destroy_program below.
    let compiled = unsafe { nvrtc::compile_program(prog, opts) };
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let result = match compiled {
        Err(e) => Err(Error::backend(
            BACKEND,
            format!("NVRTC failed to compile {name} ({e:?}):\n{log}"),
        )),
        Ok(()) => get_cubin(prog).map(|c| (c, log)),
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

fn get_cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC reports.
    unsafe {
        nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| nvrtc_err("cubin size", e))?;
        let mut buf = vec![0u8; size];
        nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
            .result()
            .map_err(|e| nvrtc_err("cubin", e))?;
        Ok(buf)
    }
}

/// Compiles every variant that builds for `arch` and writes one `<variant>.cubin` each into
/// `out_dir` (created if missing). Returns the written paths, in variant order.
pub fn compile_all(arch: &str, out_dir: &Path) -> Result<Vec<PathBuf>> {
    check_arch(arch)?;
    std::fs::create_dir_all(out_dir).map_err(|e| {
        Error::backend(BACKEND, format!("cannot create {}: {e}", out_dir.display()))
    })?;
    let mut paths = Vec::new();
    for v in variants_for_arch(arch) {
        let c = compile(&v, arch)?;
        let path = out_dir.join(format!("{}.cubin", v.name()));
        std::fs::write(&path, &c.cubin).map_err(|e| {
            Error::backend(BACKEND, format!("cannot write {}: {e}", path.display()))
        })?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_strings_are_checked() {
        assert!(check_arch("sm_90a").is_ok());
        assert!(check_arch("sm_80").is_ok());
        for bad in ["", "sm_", "sm_9", "compute_90", "sm_9x", "90a"] {
            assert!(
                matches!(
                    check_arch(bad),
                    Err(Error::InvalidSpec { field: "arch", .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn options_name_arch_and_defines() {
        let o = options(&Variant::generic(flashattn_core::DType::F16), "sm_86");
        assert!(o.contains(&"--gpu-architecture=sm_86".to_string()));
        assert!(o.contains(&"-DFA_DTYPE=1".to_string()));
    }
}
