//! NVRTC compilation through the on-disk cubin cache, and ahead-of-time `compile_all`
//! (every variant of an arch, compiled in parallel).

use crate::cache::{cache_key, cache_root, cubin_path, get_or_build, write_atomic, Built};
use crate::loader::load_nvrtc;
use crate::variants::{sm_number, variants_for_arch, Variant};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use flashattn_core::{Error, Result};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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
    match sm_number(arch) {
        Some(_) => Ok(()),
        None => Err(Error::argument(
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

/// Compiles `variant` for `arch` through the disk cache and hands the cubin to `load`; a
/// cached cubin that fails its check or that `load` refuses is deleted and compiled again.
pub(crate) fn compile_with<T>(
    variant: &Variant,
    arch: &str,
    load: impl Fn(&[u8]) -> Result<T>,
) -> Result<Built<T>> {
    check_arch(arch)?;
    if !variant.builds_for(arch) {
        return Err(Error::unsupported(
            BACKEND,
            format!("kernel {} does not build for {arch}", variant.name()),
        ));
    }
    let version = nvrtc_version()?;
    let source = variant.source();
    let opts = options(variant, arch);
    let key = cache_key(&source, &opts, arch, version);
    let path = cache_root().map(|dir| cubin_path(&dir, &variant.name(), arch, key));
    get_or_build(
        path.as_deref(),
        || compile_uncached(&variant.name(), &source, &opts),
        load,
    )
}

/// Compiles `variant` for `arch`, through the disk cache.
pub fn compile(variant: &Variant, arch: &str) -> Result<Compiled> {
    let built = compile_with(variant, arch, |c| Ok(c.to_vec()))?;
    Ok(Compiled {
        cubin: built.value,
        from_cache: built.log.is_none(),
        log: built.log.unwrap_or_default(),
    })
}

/// Compiles `source` with `opts` as they are, bypassing the cache (tests of the sources).
pub fn compile_source(name: &str, source: &str, opts: &[String]) -> Result<Compiled> {
    nvrtc_version()?;
    let (cubin, log) = compile_uncached(name, source, opts)?;
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

/// Compiles each of `variants` for `arch` on `threads` threads (NVRTC compiles independent
/// programs concurrently); results in the order of `variants`.
pub fn compile_many(variants: &[Variant], arch: &str, threads: usize) -> Vec<Result<Compiled>> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Compiled>>>> =
        variants.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, variants.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(v) = variants.get(i) else { break };
                let r = compile(v, arch);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(Error::backend(BACKEND, "compile thread did not run")))
        })
        .collect()
}

/// Threads for ahead-of-time compiles: the machine's cores.
pub fn compile_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Compiles every variant that builds for `arch` (in parallel) and writes one
/// `<variant>.cubin` each into `out_dir` (created if missing). Returns the written paths, in
/// variant order.
pub fn compile_all(arch: &str, out_dir: &Path) -> Result<Vec<PathBuf>> {
    check_arch(arch)?;
    std::fs::create_dir_all(out_dir).map_err(|e| {
        Error::backend(BACKEND, format!("cannot create {}: {e}", out_dir.display()))
    })?;
    let variants = variants_for_arch(arch);
    let mut paths = Vec::new();
    for (v, c) in variants
        .iter()
        .zip(compile_many(&variants, arch, compile_threads()))
    {
        let path = out_dir.join(format!("{}.cubin", v.name()));
        write_atomic(&path, &c?.cubin).map_err(|e| {
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
                    Err(Error::InvalidArgument {
                        argument: "arch",
                        ..
                    })
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
