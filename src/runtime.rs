//! The runtime: discovers the backends this machine offers and picks one per problem.

use crate::autotune::Autotuner;
use crate::discovery::{self, KNOWN_BACKENDS};
use flashattn_core::{AttentionSpec, Backend, Error, Result};
use std::sync::{Arc, OnceLock};

/// What discovery found for one backend.
#[derive(Clone, Debug)]
pub struct BackendStatus {
    pub name: &'static str,
    pub available: bool,
    /// The device when available, else why not.
    pub detail: String,
}

/// A backend chosen for a problem, and why.
#[derive(Clone)]
pub struct Selection {
    pub backend: Arc<dyn Backend>,
    pub reason: String,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.backend.name(), self.reason)
    }
}

pub struct Runtime {
    /// Available backends in static priority order.
    backends: Vec<Arc<dyn Backend>>,
    statuses: Vec<BackendStatus>,
    /// Set by `FLASHATTN_BACKEND` (anything but "auto").
    forced: Option<String>,
    tuner: Autotuner,
}

impl Runtime {
    /// Discovers every backend of this build; reads `FLASHATTN_BACKEND` and the autotune settings.
    pub fn new() -> Runtime {
        let mut backends = Vec::new();
        let mut statuses = Vec::new();
        for &name in KNOWN_BACKENDS {
            match discovery::open(name) {
                Ok(b) => {
                    statuses.push(BackendStatus {
                        name,
                        available: true,
                        detail: b.device(),
                    });
                    backends.push(b);
                }
                Err(e) => statuses.push(BackendStatus {
                    name,
                    available: false,
                    detail: unavailable_reason(&e),
                }),
            }
        }
        let forced = std::env::var("FLASHATTN_BACKEND")
            .ok()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty() && s != "auto");
        Runtime {
            backends,
            statuses,
            forced,
            tuner: Autotuner::from_env(),
        }
    }

    /// A runtime over the given backends (in priority order), without the environment override.
    pub fn with_backends(backends: Vec<Arc<dyn Backend>>, tuner_enabled: bool) -> Runtime {
        let statuses = backends
            .iter()
            .map(|b| BackendStatus {
                name: b.name(),
                available: true,
                detail: b.device(),
            })
            .collect();
        Runtime {
            backends,
            statuses,
            forced: None,
            tuner: Autotuner::in_memory(tuner_enabled),
        }
    }

    /// The process-wide runtime, discovered on first use.
    pub fn global() -> &'static Runtime {
        static RUNTIME: OnceLock<Runtime> = OnceLock::new();
        RUNTIME.get_or_init(Runtime::new)
    }

    /// What discovery found, for every backend this build knows.
    pub fn statuses(&self) -> &[BackendStatus] {
        &self.statuses
    }

    /// The available backends, in static priority order.
    pub fn backends(&self) -> &[Arc<dyn Backend>] {
        &self.backends
    }

    /// Backend `name`, or an error saying why it is not available here.
    pub fn backend(&self, name: &str) -> Result<Arc<dyn Backend>> {
        if let Some(b) = self.backends.iter().find(|b| b.name() == name) {
            return Ok(b.clone());
        }
        match self.statuses.iter().find(|s| s.name == name) {
            Some(s) => Err(Error::Unavailable {
                backend: s.name,
                reason: s.detail.clone(),
            }),
            None => Err(Error::invalid(
                "backend",
                name,
                format!(
                    "unknown backend (known: auto, {})",
                    KNOWN_BACKENDS.join(", ")
                ),
            )),
        }
    }

    /// Picks the backend for `spec`: `FLASHATTN_BACKEND` if set, else the fastest that supports it.
    pub fn select(&self, spec: &AttentionSpec) -> Result<Selection> {
        self.select_with(spec, self.forced.as_deref())
    }

    /// Like `select`, with an explicit choice (`None` or "auto" picks by itself).
    pub fn select_with(&self, spec: &AttentionSpec, choice: Option<&str>) -> Result<Selection> {
        spec.validate()?;
        let selection = match choice.filter(|c| *c != "auto") {
            Some(name) => {
                let backend = self.backend(name)?;
                backend.supports(spec)?;
                let why = if self.forced.as_deref() == Some(name) {
                    "forced by FLASHATTN_BACKEND"
                } else {
                    "chosen explicitly"
                };
                Selection {
                    backend,
                    reason: why.to_string(),
                }
            }
            None => self.pick(spec)?,
        };
        log::info!(
            "flashattn: {} runs {spec}: {}",
            selection.backend.name(),
            selection.reason
        );
        Ok(selection)
    }

    fn pick(&self, spec: &AttentionSpec) -> Result<Selection> {
        let mut candidates = Vec::new();
        let mut refusals = Vec::new();
        for b in &self.backends {
            match b.supports(spec) {
                Ok(()) => candidates.push(b.clone()),
                Err(e) => refusals.push(format!("{}: {}", b.name(), unsupported_reason(&e))),
            }
        }
        for s in self.statuses.iter().filter(|s| !s.available) {
            refusals.push(format!("{}: unavailable ({})", s.name, s.detail));
        }
        let others = if refusals.is_empty() {
            String::new()
        } else {
            format!("; not used: {}", refusals.join("; "))
        };
        match candidates.len() {
            0 => Err(Error::Unsupported {
                backend: "any",
                reason: format!("no backend runs {spec}{others}"),
            }),
            1 => Ok(Selection {
                backend: candidates.remove(0),
                reason: format!("the only backend that supports this problem{others}"),
            }),
            _ => {
                let (index, why) = self.tuner.fastest(spec, &candidates);
                Ok(Selection {
                    backend: candidates.swap_remove(index),
                    reason: format!("{why}{others}"),
                })
            }
        }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime::new()
    }
}

fn unavailable_reason(e: &Error) -> String {
    match e {
        Error::Unavailable { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

fn unsupported_reason(e: &Error) -> String {
    match e {
        Error::Unsupported { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
