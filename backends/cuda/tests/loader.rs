//! The NVRTC lookup runs no program (issue: it used to execute whatever `python3` came first on
//! PATH to ask for site-packages). A `python3` that leaves a mark is put first on PATH; the
//! whole lookup, loading included, must not run it. Its own test binary: it changes PATH.

use std::path::PathBuf;

#[test]
fn nvrtc_lookup_runs_no_python_from_path() {
    let dir = std::env::temp_dir().join(format!("flashattn-fake-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mark: PathBuf = dir.join("python3-was-run");
    let fake = dir.join("python3");
    std::fs::write(&fake, format!("#!/bin/sh\ntouch '{}'\n", mark.display())).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.clone()];
    dirs.extend(std::env::split_paths(&path));
    std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());
    // The fake would run if anything executed `python3` by name.
    assert!(std::process::Command::new("python3")
        .status()
        .is_ok_and(|s| s.success()));
    assert!(mark.exists(), "the fake python3 leaves its mark");
    std::fs::remove_file(&mark).unwrap();

    let searched = flashattn_cuda::nvrtc_search_dirs();
    let _ = flashattn_cuda::nvrtc_status(); // the full lookup: search, then load if found
    assert!(!mark.exists(), "the NVRTC lookup ran python3 from PATH");
    assert!(!searched.is_empty() && searched.iter().all(|d| d.is_absolute()));
    let _ = std::fs::remove_dir_all(&dir);
}
