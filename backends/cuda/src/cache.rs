//! On-disk cubin cache: one file per (variant, arch, key), where the key hashes the kernel
//! source, the NVRTC options, the arch and the NVRTC version, so any change recompiles.
//!
//! Each file starts with a header holding the cubin's length and content hash. A file that
//! fails that check, or whose cubin the driver refuses, is deleted and the kernel compiled
//! again ([`get_or_build`]), so a damaged file costs one compile, never a permanent error. The
//! hash detects damage (truncation, bit flips); it is no defence against someone who can write
//! the folder, which is why the folder is the user's own (never a shared temp folder).

use flashattn_core::Result;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The cache folder: `$FLASHATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/flashattn`, else
/// `$HOME/.cache/flashattn`; each only if absolute (an empty or relative value is ignored).
/// `None`: no disk cache (kernels are compiled once per process).
pub fn cache_root() -> Option<PathBuf> {
    cache_root_from(&|name| std::env::var_os(name))
}

fn cache_root_from(var: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let absolute = |name| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
    absolute("FLASHATTN_CACHE_DIR")
        .or_else(|| absolute("XDG_CACHE_HOME").map(|d| d.join("flashattn")))
        .or_else(|| absolute("HOME").map(|h| h.join(".cache").join("flashattn")))
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

/// Header of a cache file: magic, cubin length, cubin hash (little endian).
const MAGIC: &[u8; 8] = b"FACUBIN1";
const HEADER: usize = 24;

/// A cubin with its header, as stored.
pub fn encode(cubin: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + cubin.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    v.extend_from_slice(&fnv1a64(&[cubin]).to_le_bytes());
    v.extend_from_slice(cubin);
    v
}

/// The cubin of a stored file, if its header, length and hash check out.
pub fn decode(file: &[u8]) -> Option<&[u8]> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(file.get(i..i + 8)?.try_into().ok()?))
    };
    if file.get(..8)? != MAGIC {
        return None;
    }
    let (len, hash) = (word(8)?, word(16)?);
    let cubin = file.get(HEADER..)?;
    (cubin.len() as u64 == len && len > 0 && fnv1a64(&[cubin]) == hash).then_some(cubin)
}

/// The cubin stored at `path`; a file that fails the check is deleted.
pub fn read_verified(path: &Path) -> Option<Vec<u8>> {
    let file = std::fs::read(path).ok()?;
    match decode(&file) {
        Some(cubin) => Some(cubin.to_vec()),
        None => {
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// Writes `bytes` to `path` atomically: a uniquely named temporary file beside it, then a
/// rename, so neither a concurrent reader nor a concurrent writer sees half a file. Creates
/// the folder (private to the user on Unix) if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("cache path has no folder"))?;
    if !dir.is_dir() {
        create_private_dir(dir)?;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.{nanos}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// What [`get_or_build`] returns: the loaded value and NVRTC's log (`None`: from the cache).
pub struct Built<T> {
    pub value: T,
    pub log: Option<String>,
}

/// The cache's protocol. A stored cubin that passes the check goes to `load`; if there is
/// none, or the check or `load` fails, the file is deleted, `build` compiles the cubin (and
/// its log), the result is stored and `load` gets it. A cache that cannot be written only
/// costs time: the next process compiles again. `path: None` bypasses the disk.
pub fn get_or_build<T>(
    path: Option<&Path>,
    build: impl FnOnce() -> Result<(Vec<u8>, String)>,
    load: impl Fn(&[u8]) -> Result<T>,
) -> Result<Built<T>> {
    if let Some(path) = path {
        if let Some(cubin) = read_verified(path) {
            match load(&cubin) {
                Ok(value) => return Ok(Built { value, log: None }),
                Err(e) => {
                    log::warn!(
                        "cached cubin {} refused ({e}); compiling again",
                        path.display()
                    );
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
    let (cubin, log) = build()?;
    let value = load(&cubin)?;
    if let Some(path) = path {
        let _ = write_atomic(path, &encode(&cubin));
    }
    Ok(Built {
        value,
        log: Some(log),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn_core::Error;
    use std::cell::Cell;

    fn temp_dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("flashattn-cache-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

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
        // FNV-1a 64 of "a" (without our part separator) is a published constant.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        h ^= b'a' as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        assert_eq!(h, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn root_ignores_empty_and_relative_values_and_has_no_shared_fallback() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let root = |pairs| cache_root_from(&env(pairs));
        assert_eq!(
            root(&[("FLASHATTN_CACHE_DIR", "/c"), ("HOME", "/h")]),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            root(&[("FLASHATTN_CACHE_DIR", ""), ("XDG_CACHE_HOME", "/x")]),
            Some(PathBuf::from("/x/flashattn"))
        );
        assert_eq!(
            root(&[("FLASHATTN_CACHE_DIR", "rel"), ("HOME", "/h")]),
            Some(PathBuf::from("/h/.cache/flashattn"))
        );
        assert_eq!(root(&[("XDG_CACHE_HOME", "x"), ("HOME", "")]), None);
        assert_eq!(root(&[]), None);
    }

    #[test]
    fn stored_files_round_trip_and_damage_is_detected() {
        let cubin = b"\x7fELF some cubin bytes".to_vec();
        let file = encode(&cubin);
        assert_eq!(decode(&file), Some(&cubin[..]));
        for bad in [
            file[..file.len() - 1].to_vec(), // truncated
            {
                let mut f = file.clone();
                f[HEADER + 3] ^= 1; // one bit flipped in the cubin
                f
            },
            cubin.clone(), // an old headerless cache file
            Vec::new(),
            encode(&[]),
        ] {
            assert_eq!(decode(&bad), None);
        }
    }

    #[test]
    fn atomic_write_round_trips_with_unique_temp_names() {
        let dir = temp_dir("write");
        let p = cubin_path(&dir, "v", "sm_90a", 42);
        assert!(p
            .to_string_lossy()
            .ends_with("v-sm_90a-000000000000002a.cubin"));
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let p = &p;
                s.spawn(move || write_atomic(p, &[i; 1000]).unwrap());
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert!(got.len() == 1000 && got.iter().all(|&b| b == got[0]));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "cache folder is private: {mode:o}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_or_refused_cache_file_is_deleted_and_rebuilt() {
        let dir = temp_dir("rebuild");
        let path = dir.join("k.cubin");
        let good = b"good cubin".to_vec();
        let builds = Cell::new(0);
        let build = || {
            builds.set(builds.get() + 1);
            Ok((good.clone(), "ptxas log".to_string()))
        };
        let load = |c: &[u8]| -> Result<Vec<u8>> {
            if c == good.as_slice() {
                Ok(c.to_vec())
            } else {
                Err(Error::backend("cuda", "cuModuleLoadData: invalid image"))
            }
        };
        // First use: compiled and stored.
        let b = get_or_build(Some(&path), build, load).unwrap();
        assert_eq!(
            (b.value, b.log.is_some(), builds.get()),
            (good.clone(), true, 1)
        );
        // Second use: from the cache.
        let b = get_or_build(Some(&path), build, load).unwrap();
        assert_eq!((b.log, builds.get()), (None, 1));
        // A damaged file: deleted, rebuilt, stored again.
        let mut f = std::fs::read(&path).unwrap();
        let last = f.len() - 1;
        f[last] ^= 0x55;
        std::fs::write(&path, &f).unwrap();
        let b = get_or_build(Some(&path), build, load).unwrap();
        assert_eq!((b.value, builds.get()), (good.clone(), 2));
        assert_eq!(read_verified(&path), Some(good.clone()));
        // A file that checks out but that the driver refuses: the same.
        std::fs::write(&path, encode(b"stale cubin")).unwrap();
        let b = get_or_build(Some(&path), build, load).unwrap();
        assert_eq!((b.value, builds.get()), (good.clone(), 3));
        assert_eq!(read_verified(&path), Some(good.clone()));
        // Garbage: deleted by the check alone.
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(read_verified(&path), None);
        assert!(!path.exists());
        // A build that fails is an error, not a panic, and stores nothing.
        let e = get_or_build(
            Some(&path),
            || Err(Error::backend("cuda", "NVRTC failed")),
            load,
        );
        assert!(e.is_err() && !path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
