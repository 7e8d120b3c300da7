//! Command-line flags the CPU examples share (`--name value` pairs and bare flags).
#![allow(dead_code)] // each example uses part of it

use flashattn_cpu::{CpuBackend, Isa};

pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Args {
        Args(std::env::args().skip(1).collect())
    }

    /// The value after `name`, if given.
    pub fn opt(&self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).cloned()
    }

    /// Whether the bare flag `name` is given.
    pub fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The value of `name` parsed, else `default`; panics naming the flag on a bad value.
    pub fn num(&self, name: &str, default: usize) -> usize {
        self.opt(name)
            .map_or(default, |s| s.parse().unwrap_or_else(|_| panic!("{name}")))
    }

    /// The backend of `--threads N` (default: all) and `--isa` (default: the best here).
    pub fn backend(&self) -> CpuBackend {
        let backend = match self.opt("--threads") {
            Some(t) => CpuBackend::with_threads(t.parse().expect("--threads")),
            None => CpuBackend::new(),
        };
        match self.opt("--isa") {
            Some(isa) => {
                let isa: Isa = isa.parse().expect("--isa");
                backend.with_isa(isa).expect("--isa")
            }
            None => backend,
        }
    }
}
