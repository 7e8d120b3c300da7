//! On-disk cubin cache: one file per (variant, arch, key), where the key hashes the kernel
//! source, the NVRTC options, the arch and the NVRTC version, so any change recompiles.

use std::path::{Path, PathBuf};

/// `$FLASHATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/flashattn`, else `~/.cache/flashattn`.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("FLASHATTN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("flashattn")
}

/// FNV-1a, 64 bit: stable across Rust versions and platforms (unlike `DefaultHasher`).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache key of one compilation.
pub fn cache_key(source: &str, options: &[String], arch: &str, nvrtc_version: (i32, i32)) -> u64 {
    let opts = options.join("\u{1}");
    let ver = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
    fnv1a64(&[
        source.as_bytes(),
        opts.as_bytes(),
        arch.as_bytes(),
        ver.as_bytes(),
    ])
}

pub fn cubin_path(dir: &Path, variant: &str, arch: &str, key: u64) -> PathBuf {
    dir.join(format!("{variant}-{arch}-{key:016x}.cubin"))
}

/// Writes `bytes` to `path` atomically (temp file + rename), so a concurrent reader never
/// sees half a cubin.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_input() {
        let opts = vec!["-DX=1".to_string()];
        let k = cache_key("src", &opts, "sm_90a", (13, 0));
        assert_eq!(k, cache_key("src", &opts, "sm_90a", (13, 0)));
        assert_ne!(k, cache_key("src2", &opts, "sm_90a", (13, 0)));
        assert_ne!(
            k,
            cache_key("src", &["-DX=2".to_string()], "sm_90a", (13, 0))
        );
        assert_ne!(k, cache_key("src", &opts, "sm_80", (13, 0)));
        assert_ne!(k, cache_key("src", &opts, "sm_90a", (13, 1)));
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }

    #[test]
    fn fnv_matches_known_value() {
        // FNV-1a 64 of the empty input is the offset basis; of "a" a published constant.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        h ^= b'a' as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        assert_eq!(h, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn atomic_write_round_trips() {
        let dir = std::env::temp_dir().join(format!("flashattn-cache-test-{}", std::process::id()));
        let p = cubin_path(&dir, "v", "sm_90a", 42);
        assert!(p
            .to_string_lossy()
            .ends_with("v-sm_90a-000000000000002a.cubin"));
        write_atomic(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
