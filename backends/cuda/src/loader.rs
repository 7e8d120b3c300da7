//! Finds libcuda (the driver) and NVRTC at run time.
//!
//! cudarc opens both by library name. NVRTC often lives outside the loader's path (the pip
//! wheel `nvidia-cuda-nvrtc`, a CUDA toolkit not on `LD_LIBRARY_PATH`), so we first open the
//! library by absolute path: once loaded, the dynamic loader resolves cudarc's by-name open
//! (`libnvrtc.so.13`) to it through its soname. NVRTC in turn opens `libnvrtc-builtins`
//! by name, so that one is preloaded from the same folder first.
//!
//! The search looks only at the environment and at fixed places ([`nvrtc_search_dirs`]); it
//! runs no program (a library must not execute whatever `python3` is first on PATH), and it
//! ignores relative paths, which would make the folder a process happens to run in decide
//! which library it loads.

use libloading::Library;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// NVRTC sonames we accept, newest first: the ones cudarc's own by-name open tries for the
/// CUDA version it was built for (13.x bindings also try .12; 12.x bindings never try .13).
/// Without `cuda-13000` (`cuda-12080`, or `cuda-version-from-build-system`, whose version we
/// cannot see) only .12 is safe for both: a lone .13 then fails here with our message
/// instead of in cudarc's open, which panics.
#[cfg(feature = "cuda-13000")]
const NVRTC_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12"];
#[cfg(not(feature = "cuda-13000"))]
const NVRTC_NAMES: &[&str] = &["libnvrtc.so.12"];

/// The driver's names, as cudarc opens it.
const DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// Whether one of `names` opens by name. Our own probe: cudarc's `is_culib_present` exists only
/// under its `dynamic-loading`, and a build next to candle-core links dynamically instead.
fn opens_by_name(names: &[&str]) -> bool {
    names.iter().any(|name| {
        // SAFETY: loading NVIDIA's libraries runs their initialisers, which have no preconditions.
        unsafe { Library::new(*name) }.is_ok()
    })
}

/// Libraries we opened ourselves; kept loaded for the life of the process.
fn keep() -> &'static Mutex<Vec<Library>> {
    static KEEP: OnceLock<Mutex<Vec<Library>>> = OnceLock::new();
    KEEP.get_or_init(|| Mutex::new(Vec::new()))
}

fn open(path: &Path) -> Result<(), String> {
    // SAFETY: loading NVIDIA's libraries runs their initialisers, which have no preconditions.
    let lib = unsafe { Library::new(path) }.map_err(|e| format!("{}: {e}", path.display()))?;
    keep().lock().unwrap_or_else(|e| e.into_inner()).push(lib);
    Ok(())
}

/// Makes libcuda loadable; `Err` says precisely what is missing.
pub fn load_driver() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("FLASHATTN_CUDA_PATH") {
                let p = PathBuf::from(p);
                let file = if p.is_dir() { p.join("libcuda.so.1") } else { p };
                open(&file).map_err(|e| format!("FLASHATTN_CUDA_PATH: cannot open {e}"))?;
            }
            if opens_by_name(DRIVER_NAMES) {
                Ok(())
            } else {
                Err("libcuda.so not found (no NVIDIA driver); set FLASHATTN_CUDA_PATH to its file or folder if it is installed elsewhere".into())
            }
        })
        .clone()
}

/// Where to look: the environment and a folder lister (both replaceable in tests).
pub struct SearchEnv<'a> {
    pub var: &'a dyn Fn(&str) -> Option<OsString>,
    /// The entries of a folder (empty when it cannot be read).
    pub list: &'a dyn Fn(&Path) -> Vec<PathBuf>,
}

fn list_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|es| es.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Folders that may hold NVRTC, most specific first (see [`nvrtc_search_dirs_in`]).
pub fn nvrtc_search_dirs() -> Vec<PathBuf> {
    nvrtc_search_dirs_in(&SearchEnv {
        var: &|name| std::env::var_os(name),
        list: &list_dir,
    })
}

/// Folders that may hold NVRTC, most specific first: `FLASHATTN_NVRTC_PATH` (a folder or the
/// library file); `CUDA_PATH`, `CUDA_HOME`, `CUDA_ROOT`; `/usr/local/cuda`; the folder
/// scripts/install-cuda-wheels.sh installs into (`FLASHATTN_CUDA_WHEELS`, else under the
/// cache folder); then the pip wheels (`nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`) in the
/// site-packages of `VIRTUAL_ENV`, `CONDA_PREFIX`, the user's `~/.local`, `/usr/local`,
/// `/usr` and `/opt/conda`. Relative values are ignored.
pub fn nvrtc_search_dirs_in(env: &SearchEnv<'_>) -> Vec<PathBuf> {
    let var = |name: &str| {
        (env.var)(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let mut dirs = Vec::new();
    if let Some(p) = var("FLASHATTN_NVRTC_PATH") {
        let is_lib = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libnvrtc"));
        dirs.push(match (is_lib, p.parent()) {
            (true, Some(parent)) => parent.to_path_buf(),
            _ => p,
        });
    }
    let toolkit = |root: &Path, dirs: &mut Vec<PathBuf>| {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("lib"));
        for target in ["x86_64-linux", "sbsa-linux", "aarch64-linux"] {
            dirs.push(root.join("targets").join(target).join("lib"));
        }
    };
    for name in ["CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
        if let Some(root) = var(name) {
            toolkit(&root, &mut dirs);
        }
    }
    toolkit(Path::new("/usr/local/cuda"), &mut dirs);
    let wheels = var("FLASHATTN_CUDA_WHEELS")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("flashattn/cuda-wheels")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/flashattn/cuda-wheels")));
    let mut sites: Vec<PathBuf> = wheels.into_iter().collect();
    let mut lib_dirs: Vec<PathBuf> = Vec::new();
    for name in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        lib_dirs.extend(var(name).map(|p| p.join("lib")));
    }
    lib_dirs.extend(var("HOME").map(|h| h.join(".local/lib")));
    lib_dirs.extend(["/usr/local/lib", "/usr/lib", "/opt/conda/lib"].map(PathBuf::from));
    for lib in lib_dirs {
        let mut pythons: Vec<PathBuf> = (env.list)(&lib)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pythons.sort();
        pythons.reverse(); // newest Python first, as far as names sort
        for py in pythons {
            sites.push(py.join("site-packages"));
            sites.push(py.join("dist-packages"));
        }
    }
    sites.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    for site in sites {
        dirs.push(site.join("nvidia/cu13/lib"));
        dirs.push(site.join("nvidia/cuda_nvrtc/lib"));
    }
    dirs
}

/// The NVRTC library file in `dir`, if any.
pub fn nvrtc_in(dir: &Path) -> Option<PathBuf> {
    NVRTC_NAMES
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Makes NVRTC loadable; `Err` says where we looked.
pub fn load_nvrtc() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let dirs = nvrtc_search_dirs();
            if let Some((dir, lib)) = dirs.iter().find_map(|d| nvrtc_in(d).map(|l| (d, l))) {
                for e in list_dir(dir) {
                    let name = e
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if name.starts_with("libnvrtc-builtins.so.") && !name.contains(".alt.") {
                        let _ = open(&e);
                    }
                }
                open(&lib)?;
            }
            if opens_by_name(NVRTC_NAMES) {
                Ok(())
            } else {
                Err(format!(
                    "NVRTC not found ({} in FLASHATTN_NVRTC_PATH, CUDA_PATH, /usr/local/cuda, the pip wheels \
                     nvidia-cuda-nvrtc, or the library path); install it with scripts/install-cuda-wheels.sh \
                     or set FLASHATTN_NVRTC_PATH to its folder",
                    NVRTC_NAMES.join(" / ")
                ))
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_from_the_environment() {
        let vars = |name: &str| -> Option<OsString> {
            match name {
                "FLASHATTN_NVRTC_PATH" => Some("/opt/nv/lib/libnvrtc.so.13".into()),
                "CUDA_HOME" => Some("/cuda".into()),
                "CUDA_PATH" => Some("relative/cuda".into()), // ignored
                "VIRTUAL_ENV" => Some("/venv".into()),
                "HOME" => Some("/home/u".into()),
                _ => None,
            }
        };
        let list = |dir: &Path| -> Vec<PathBuf> {
            match dir.to_str() {
                Some("/venv/lib") => vec!["/venv/lib/python3.11".into(), "/venv/lib/site".into()],
                Some("/usr/lib") => vec!["/usr/lib/python3.12".into(), "/usr/lib/x".into()],
                _ => Vec::new(),
            }
        };
        let dirs = nvrtc_search_dirs_in(&SearchEnv {
            var: &vars,
            list: &list,
        });
        let pos = |p: &str| {
            dirs.iter()
                .position(|d| d == Path::new(p))
                .unwrap_or_else(|| panic!("{p} not searched: {dirs:#?}"))
        };
        assert_eq!(pos("/opt/nv/lib"), 0, "a library file names its folder");
        assert!(pos("/cuda/lib64") < pos("/usr/local/cuda/lib64"));
        assert!(
            pos("/usr/local/cuda/lib64")
                < pos("/home/u/.cache/flashattn/cuda-wheels/nvidia/cu13/lib")
        );
        assert!(
            pos("/home/u/.cache/flashattn/cuda-wheels/nvidia/cu13/lib")
                < pos("/venv/lib/python3.11/site-packages/nvidia/cu13/lib")
        );
        pos("/venv/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib");
        pos("/usr/lib/python3.12/dist-packages/nvidia/cu13/lib");
        pos("/usr/lib/python3/dist-packages/nvidia/cuda_nvrtc/lib");
        assert!(dirs.iter().all(|d| d.is_absolute()), "{dirs:#?}");
        assert!(!dirs.iter().any(|d| d.starts_with("relative")));
        assert!(!dirs.iter().any(|d| d.starts_with("/venv/lib/site")));
    }

    #[test]
    fn a_folder_in_flashattn_nvrtc_path_is_taken_as_is() {
        let vars = |name: &str| {
            (name == "FLASHATTN_NVRTC_PATH").then(|| OsString::from("/w/nvidia/cu13/lib"))
        };
        let dirs = nvrtc_search_dirs_in(&SearchEnv {
            var: &vars,
            list: &|_| Vec::new(),
        });
        assert_eq!(dirs[0], PathBuf::from("/w/nvidia/cu13/lib"));
    }
}
