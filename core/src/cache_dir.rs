//! Where flashattn keeps what it learns about a machine (autotune timings, canary verdicts,
//! compiled kernels): one rule for every crate.

use std::path::PathBuf;

/// `$FLASHATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/flashattn`, else `$HOME/.cache/flashattn`.
/// Only absolute paths count: an empty or relative value is ignored (it would depend on the
/// working directory). `None` when no rule gives one: nothing is cached then, and there is no
/// fallback to a shared, world-writable directory such as `/tmp`.
pub fn cache_dir() -> Option<PathBuf> {
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    absolute("FLASHATTN_CACHE_DIR")
        .or_else(|| absolute("XDG_CACHE_HOME").map(|d| d.join("flashattn")))
        .or_else(|| absolute("HOME").map(|h| h.join(".cache").join("flashattn")))
}
