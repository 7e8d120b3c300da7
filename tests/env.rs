//! The library reads its settings from the environment: FLASHATTN_BACKEND (an invalid value is
//! an error from every selection), the switches, and the cache directory (absolute paths only).
//! One test in this binary: it changes the environment.

use flashattn::{AttentionSpec, Pass, Runtime, Settings};
use std::path::PathBuf;

#[test]
fn the_environment_decides_and_invalid_values_are_errors() {
    std::env::set_var("FLASHATTN_BACKEND", "cpu");
    std::env::set_var("FLASHATTN_CANARY", "off");
    std::env::set_var("FLASHATTN_AUTOTUNE", "0");
    let spec = AttentionSpec::new(1, 2, 9, 9, 16);
    let s = Runtime::new().select(&spec).unwrap();
    assert_eq!(s.backend.name(), "cpu");
    assert!(s.reason.contains("FLASHATTN_BACKEND"), "{}", s.reason);
    let settings = Settings::from_env().unwrap();
    assert!(!settings.canary && !settings.autotune);

    std::env::set_var("FLASHATTN_BACKEND", "TPU");
    let err = Runtime::from_env().err().unwrap().to_string();
    assert!(
        err.contains("FLASHATTN_BACKEND = TPU") && err.contains("known: auto"),
        "{err}"
    );
    // Runtime::new cannot fail, but every selection reports the setting.
    let rt = Runtime::new();
    for pass in [Pass::Forward, Pass::Backward] {
        let err = rt.select_for(&spec, pass).unwrap_err().to_string();
        assert!(err.contains("FLASHATTN_BACKEND = TPU"), "{err}");
    }
    std::env::set_var("FLASHATTN_BACKEND", "auto");
    assert!(Settings::from_env().unwrap().forced.is_none());

    std::env::set_var("HOME", "/home/someone");
    std::env::remove_var("XDG_CACHE_HOME");
    let home_cache = Some(PathBuf::from("/home/someone/.cache/flashattn"));
    for ignored in ["", "relative/dir", "./cache"] {
        std::env::set_var("FLASHATTN_CACHE_DIR", ignored);
        assert_eq!(
            Settings::from_env().unwrap().cache_dir,
            home_cache,
            "{ignored:?}"
        );
    }
    std::env::set_var("FLASHATTN_CACHE_DIR", "/var/cache/fa");
    assert_eq!(
        Settings::from_env().unwrap().cache_dir,
        Some(PathBuf::from("/var/cache/fa"))
    );
    std::env::remove_var("FLASHATTN_CACHE_DIR");
    std::env::set_var("XDG_CACHE_HOME", "relative");
    assert_eq!(Settings::from_env().unwrap().cache_dir, home_cache);
    std::env::remove_var("HOME");
    std::env::remove_var("XDG_CACHE_HOME");
    assert_eq!(
        Settings::from_env().unwrap().cache_dir,
        None,
        "no /tmp fallback"
    );
}
