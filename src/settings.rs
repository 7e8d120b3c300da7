//! The runtime's settings and the environment variables that set them.

use crate::discovery::KNOWN_BACKENDS;
use flashattn_core::{Error, Result};
use std::path::PathBuf;

/// How a [`Runtime`](crate::Runtime) chooses and checks backends.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `Some(name)`: every selection uses this backend (`FLASHATTN_BACKEND`); `None`: auto.
    pub forced: Option<String>,
    /// Time the candidates and pick the fastest (`FLASHATTN_AUTOTUNE`, on by default); off:
    /// static priority (cuda, wgpu, cpu).
    pub autotune: bool,
    /// Check each (device, kernel variant) once against the f64 reference before trusting it
    /// (`FLASHATTN_CANARY`, on by default).
    pub canary: bool,
    /// Where autotune timings and canary verdicts persist; `None` keeps them in memory.
    pub cache_dir: Option<PathBuf>,
}

impl Default for Settings {
    /// Auto selection, autotune and canary on, nothing persisted.
    fn default() -> Self {
        Settings {
            forced: None,
            autotune: true,
            canary: true,
            cache_dir: None,
        }
    }
}

impl Settings {
    /// `FLASHATTN_BACKEND`, `FLASHATTN_AUTOTUNE`, `FLASHATTN_CANARY` and the cache directory
    /// ([`flashattn_core::cache_dir`]). A value that means nothing is an error naming it.
    pub fn from_env() -> Result<Settings> {
        Ok(Settings {
            forced: backend_choice(&env("FLASHATTN_BACKEND")?, "FLASHATTN_BACKEND")?,
            autotune: switch("FLASHATTN_AUTOTUNE")?,
            canary: switch("FLASHATTN_CANARY")?,
            cache_dir: flashattn_core::cache_dir(),
        })
    }
}

/// A backend choice: `None` for "auto" (or empty), else a known backend's name.
pub fn backend_choice(value: &str, what: &'static str) -> Result<Option<String>> {
    let v = value.trim().to_ascii_lowercase();
    if v.is_empty() || v == "auto" {
        return Ok(None);
    }
    if KNOWN_BACKENDS.contains(&v.as_str()) {
        return Ok(Some(v));
    }
    Err(Error::argument(
        what,
        value,
        format!(
            "unknown backend (known: auto, {})",
            KNOWN_BACKENDS.join(", ")
        ),
    ))
}

fn env(name: &'static str) -> Result<String> {
    match std::env::var(name) {
        Ok(v) => Ok(v),
        Err(std::env::VarError::NotPresent) => Ok(String::new()),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::argument(
            name,
            v.to_string_lossy(),
            "not valid UTF-8",
        )),
    }
}

/// An on/off variable: unset, empty, 1, on, true, yes are on; 0, off, false, no are off.
fn switch(name: &'static str) -> Result<bool> {
    let value = env(name)?;
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        _ => Err(Error::argument(name, value, "expected 0 or 1")),
    }
}
