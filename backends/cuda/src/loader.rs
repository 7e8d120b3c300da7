//! Finds libcuda (the driver) and NVRTC at run time.
//!
//! cudarc opens both by library name. NVRTC often lives outside the loader's path (the pip
//! wheel `nvidia-cuda-nvrtc`, a CUDA toolkit not on `LD_LIBRARY_PATH`), so we first open the
//! library by absolute path: once loaded, the dynamic loader resolves cudarc's by-name open
//! (`libnvrtc.so.13`) to it through its soname. NVRTC in turn opens `libnvrtc-builtins`
//! by name, so that one is preloaded from the same folder first.

use libloading::Library;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// NVRTC sonames we accept, newest first.
const NVRTC_NAMES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so.12"];

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
            // SAFETY: only tries to open the library.
            if unsafe { cudarc::driver::sys::is_culib_present() } {
                Ok(())
            } else {
                Err("libcuda.so not found (no NVIDIA driver); set FLASHATTN_CUDA_PATH to its file or folder if it is installed elsewhere".into())
            }
        })
        .clone()
}

/// Folders that may hold NVRTC, most specific first.
pub fn nvrtc_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("FLASHATTN_NVRTC_PATH") {
        let p = PathBuf::from(p);
        dirs.push(if p.is_file() {
            p.parent().map(Path::to_path_buf).unwrap_or(p)
        } else {
            p
        });
    }
    for var in ["CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    // Where scripts/install-cuda-wheels.sh puts the wheels by default.
    dirs.push(crate::cache::cache_root().join("cuda-wheels/nvidia/cu13/lib"));
    for site in python_site_dirs() {
        dirs.push(site.join("nvidia/cu13/lib"));
        dirs.push(site.join("nvidia/cuda_nvrtc/lib"));
    }
    dirs
}

/// site-packages folders of the active Python environment, if any.
fn python_site_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        dirs.extend(glob_python_dirs(&PathBuf::from(venv).join("lib")));
    }
    let script =
        "import site,sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))";
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", script])
        .output()
    {
        if out.status.success() {
            dirs.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(PathBuf::from),
            );
        }
    }
    dirs
}

fn glob_python_dirs(lib: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(lib) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
        })
        .map(|p| p.join("site-packages"))
        .collect()
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
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with("libnvrtc-builtins.so.") && !name.contains(".alt.") {
                            let _ = open(&e.path());
                        }
                    }
                }
                open(&lib)?;
            }
            // SAFETY: only tries to open the library.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
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
