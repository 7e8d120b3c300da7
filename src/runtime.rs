//! The runtime: finds the backends this machine offers, each brought up the first time a
//! selection needs it (so `FLASHATTN_BACKEND=cpu` never touches a GPU driver), and picks one
//! per problem and pass: an explicit choice, else the fastest measured among those that
//! support the problem, skipping kernel variants that failed their canary.

use crate::autotune::Autotuner;
use crate::canary::{Canary, Verdict};
use crate::discovery::{self, KNOWN_BACKENDS};
use crate::settings::Settings;
use flashattn_core::{
    AttentionSpec, Backend, CacheConfig, CacheState, DecodeStep, Error, KvCacheHandle, Pass, Result,
};
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

/// Brings up one backend; the error says why it is unavailable here.
pub type Opener = Box<dyn Fn() -> Result<Arc<dyn Backend>> + Send + Sync>;

/// One backend of the runtime, opened on first use.
struct Slot {
    name: &'static str,
    open: Opener,
    state: OnceLock<std::result::Result<Arc<dyn Backend>, String>>,
}

impl Slot {
    fn get(&self) -> std::result::Result<&Arc<dyn Backend>, &str> {
        self.state
            .get_or_init(|| (self.open)().map_err(|e| unavailable_reason(&e)))
            .as_ref()
            .map_err(String::as_str)
    }
}

pub struct Runtime {
    /// In static priority order.
    slots: Vec<Slot>,
    settings: Settings,
    /// The environment held an invalid setting: every selection reports it.
    env_error: Option<Error>,
    tuner: Autotuner,
    canary: Canary,
}

impl Runtime {
    /// Every backend of this build, brought up when first needed, with the settings of the
    /// environment ([`Settings::from_env`]). An invalid setting makes every selection fail
    /// with an error naming it; [`Runtime::from_env`] reports it at once instead.
    pub fn new() -> Runtime {
        Runtime::from_env().unwrap_or_else(|e| {
            let mut rt = Runtime::with_openers(known_openers(), Settings::default());
            rt.env_error = Some(e);
            rt
        })
    }

    /// Like [`Runtime::new`], but an invalid environment setting is an error here.
    pub fn from_env() -> Result<Runtime> {
        Ok(Runtime::with_openers(
            known_openers(),
            Settings::from_env()?,
        ))
    }

    /// A runtime over the given backends (in priority order), without the environment:
    /// autotune as given, canary on, nothing persisted.
    pub fn with_backends(backends: Vec<Arc<dyn Backend>>, autotune: bool) -> Runtime {
        let settings = Settings {
            autotune,
            ..Settings::default()
        };
        Runtime::with_settings(backends, settings)
    }

    /// A runtime over the given backends (in priority order) with explicit settings.
    pub fn with_settings(backends: Vec<Arc<dyn Backend>>, settings: Settings) -> Runtime {
        let openers = backends
            .into_iter()
            .map(|b| {
                let name = b.name();
                let open: Opener = Box::new(move || Ok(b.clone()));
                (name, open)
            })
            .collect();
        Runtime::with_openers(openers, settings)
    }

    /// A runtime over backends that are brought up on first need (in priority order).
    pub fn with_openers(openers: Vec<(&'static str, Opener)>, settings: Settings) -> Runtime {
        let dir = settings.cache_dir.as_deref();
        Runtime {
            tuner: Autotuner::new(settings.autotune, dir),
            canary: Canary::new(settings.canary, dir),
            slots: openers
                .into_iter()
                .map(|(name, open)| Slot {
                    name,
                    open,
                    state: OnceLock::new(),
                })
                .collect(),
            env_error: None,
            settings,
        }
    }

    /// The process-wide runtime, made on first use.
    pub fn global() -> &'static Runtime {
        static RUNTIME: OnceLock<Runtime> = OnceLock::new();
        RUNTIME.get_or_init(Runtime::new)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What discovery finds, for every backend of this runtime (bringing each one up).
    pub fn statuses(&self) -> Vec<BackendStatus> {
        let status = |s: &Slot| match s.get() {
            Ok(b) => BackendStatus {
                name: s.name,
                available: true,
                detail: b.device(),
            },
            Err(reason) => BackendStatus {
                name: s.name,
                available: false,
                detail: reason.to_string(),
            },
        };
        self.slots.iter().map(status).collect()
    }

    /// The available backends, in static priority order (bringing each one up).
    pub fn backends(&self) -> Vec<Arc<dyn Backend>> {
        self.slots
            .iter()
            .filter_map(|s| s.get().ok().cloned())
            .collect()
    }

    /// Backend `name`, or an error saying why it is not available here.
    pub fn backend(&self, name: &str) -> Result<Arc<dyn Backend>> {
        self.slot(name)?.1.cloned()
    }

    /// The backend for the forward pass of `spec` (`FLASHATTN_BACKEND` honoured).
    pub fn select(&self, spec: &AttentionSpec) -> Result<Selection> {
        self.select_for(spec, Pass::Forward)
    }

    /// The backend for `pass` of `spec` (`FLASHATTN_BACKEND` honoured).
    pub fn select_for(&self, spec: &AttentionSpec, pass: Pass) -> Result<Selection> {
        self.select_with(spec, pass, None)
    }

    /// The backend for `pass` of `spec`: `choice` `None` follows `FLASHATTN_BACKEND`,
    /// `Some("auto")` picks by measurement, `Some(name)` takes that backend.
    pub fn select_with(
        &self,
        spec: &AttentionSpec,
        pass: Pass,
        choice: Option<&str>,
    ) -> Result<Selection> {
        let (backend, reason) = self.choose(spec, pass, choice)?;
        log::info!(
            "flashattn: {} runs the {} of {spec}: {reason}",
            backend.name(),
            pass.name()
        );
        Ok(Selection {
            backend: backend.clone(),
            reason,
        })
    }

    /// A KV cache handle on the backend selected for decode steps on it (one query head per
    /// KV head stands for the steps' shape).
    pub fn kv_cache(&self, config: CacheConfig) -> Result<Box<dyn KvCacheHandle + '_>> {
        let state = CacheState::new(config.clone())?;
        let spec = state.spec(&DecodeStep::new(config.heads_kv), 1)?;
        let (backend, reason) = self.choose(&spec, Pass::Decode, None)?;
        log::info!(
            "flashattn: {} holds the KV cache {config:?}: {reason}",
            backend.name()
        );
        backend.kv_cache(config)
    }

    fn choose(
        &self,
        spec: &AttentionSpec,
        pass: Pass,
        choice: Option<&str>,
    ) -> Result<(&Arc<dyn Backend>, String)> {
        if let Some(e) = &self.env_error {
            return Err(e.clone());
        }
        check_pass(spec, pass)?;
        let (name, why) = match choice.map(|c| c.trim().to_ascii_lowercase()) {
            None => (self.settings.forced.clone(), "forced by FLASHATTN_BACKEND"),
            Some(c) if c.is_empty() || c == "auto" => (None, ""),
            Some(c) => (Some(c), "chosen explicitly"),
        };
        match name {
            Some(name) => self.take(&name, spec, pass, why),
            None => self.pick(spec, pass),
        }
    }

    fn slot(&self, name: &str) -> Result<(&'static str, Result<&Arc<dyn Backend>>)> {
        let Some(slot) = self.slots.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = self.slots.iter().map(|s| s.name).collect();
            return Err(Error::argument(
                "backend",
                name,
                format!("unknown backend (known: auto, {})", known.join(", ")),
            ));
        };
        let backend = slot.get().map_err(|reason| Error::Unavailable {
            backend: slot.name,
            reason: reason.to_string(),
        });
        Ok((slot.name, backend))
    }

    /// The named backend, if it supports the problem and its kernel passed its canary.
    fn take(
        &self,
        name: &str,
        spec: &AttentionSpec,
        pass: Pass,
        why: &str,
    ) -> Result<(&Arc<dyn Backend>, String)> {
        let (name, backend) = self.slot(name)?;
        let backend = backend?;
        supports(backend.as_ref(), spec, pass)?;
        if let Verdict::Broken(failure) = self.canary.check(backend.as_ref(), spec, pass) {
            return Err(Error::backend(
                name,
                format!(
                    "kernel variant {} on {} failed its canary: {failure} (recorded in {}; \
                     FLASHATTN_CANARY=0 skips the check)",
                    backend.kernel_variant(spec, pass),
                    backend.device(),
                    self.canary.record_path()
                ),
            ));
        }
        Ok((backend, why.to_string()))
    }

    /// The fastest backend that supports the problem and passes its canary.
    fn pick(&self, spec: &AttentionSpec, pass: Pass) -> Result<(&Arc<dyn Backend>, String)> {
        let mut candidates = Vec::new();
        let mut refusals = Vec::new();
        for slot in &self.slots {
            match slot.get() {
                Ok(b) => match supports(b.as_ref(), spec, pass) {
                    Ok(()) => candidates.push(b),
                    Err(e) => refusals.push(format!("{}: {}", slot.name, unsupported_reason(&e))),
                },
                Err(reason) => refusals.push(format!("{}: unavailable ({reason})", slot.name)),
            }
        }
        let (order, why) = match candidates.len() {
            0 => (vec![], String::new()),
            1 => (
                vec![0],
                "the only backend that supports this problem".into(),
            ),
            _ => {
                let arcs: Vec<Arc<dyn Backend>> = candidates.iter().map(|&b| b.clone()).collect();
                self.tuner.rank(spec, pass, &arcs)
            }
        };
        let mut chosen = None;
        for i in order {
            let b = candidates[i];
            match self.canary.check(b.as_ref(), spec, pass) {
                Verdict::Broken(failure) => {
                    refusals.push(format!("{}: failed its canary ({failure})", b.name()))
                }
                _ => {
                    chosen = Some(b);
                    break;
                }
            }
        }
        let others = if refusals.is_empty() {
            String::new()
        } else {
            format!("; not used: {}", refusals.join("; "))
        };
        match chosen {
            Some(b) => Ok((b, format!("{why}{others}"))),
            None => Err(Error::Unsupported {
                backend: "any",
                reason: format!("no backend runs the {} of {spec}{others}", pass.name()),
            }),
        }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime::new()
    }
}

/// Whether `backend` can run `pass` of `spec`; `Error::Unsupported` says why not.
pub(crate) fn supports(backend: &dyn Backend, spec: &AttentionSpec, pass: Pass) -> Result<()> {
    match pass {
        Pass::Forward => backend.supports(spec),
        Pass::Backward => backend.supports_backward(spec),
        Pass::Decode => backend.supports_decode(spec),
    }
}

/// A valid spec of the kind `pass` takes: decode needs the KV cache's arguments, the forward
/// and backward passes take none.
fn check_pass(spec: &AttentionSpec, pass: Pass) -> Result<()> {
    spec.validate()?;
    match (pass, spec.kv_cache.is_some()) {
        (Pass::Decode, false) => Err(Error::invalid(
            "kv_cache",
            "none",
            "a decode step needs the KV cache's arguments",
        )),
        (Pass::Forward | Pass::Backward, true) => Err(Error::invalid(
            "kv_cache",
            "set",
            format!(
                "a spec with a KV cache runs through decode, not the {}",
                pass.name()
            ),
        )),
        _ => Ok(()),
    }
}

fn known_openers() -> Vec<(&'static str, Opener)> {
    KNOWN_BACKENDS
        .iter()
        .map(|&name| {
            let open: Opener = Box::new(move || discovery::open(name));
            (name, open)
        })
        .collect()
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
