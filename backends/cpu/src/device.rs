//! Runtime CPU-feature detection: which microkernel set this machine can run.

/// The instruction set a `CpuBackend` runs its kernels with.
///
/// The two low-precision levels change only how f16 / bf16 inputs are computed (see the
/// crate README's precision table); f32 inputs run the AVX-512 tiles on both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F + AVX512-FP16: f16 and bf16 inputs run their block products as 32-lane f16
    /// FMAs (`vfmadd231ph`), flushed into f32 at the end of each tile.
    Avx512Fp16,
    /// AVX-512F + AVX512-BF16: bf16 inputs run their block products as `vdpbf16ps` (exact
    /// products, f32 accumulation); f16 inputs use the f32 tiles.
    Avx512Bf16,
    /// x86_64 AVX-512F (16-lane FMA, 32 registers).
    Avx512,
    /// x86_64 AVX2 + FMA + F16C (8-lane FMA, 16 registers).
    Avx2,
    /// Plain Rust that the compiler vectorises for the build target (SSE2, NEON, ...).
    Portable,
}

impl Isa {
    /// The fastest instruction set this CPU has: `Avx512Fp16` (f16 / bf16 forward on f16
    /// tiles, 1.25-1.45x the f32 forward on the one CPU measured, PERF_NOTES.md), else the f32
    /// tiles. `Avx512Bf16` is opt-in (`CpuBackend::with_isa`): its `vdpbf16ps` tiles ran at
    /// ~0.6x the f32 tiles there.
    pub fn detect() -> Isa {
        [Isa::Avx512Fp16, Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Every instruction set this CPU can run, fastest first.
    pub fn all_available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.available()).collect()
    }

    /// Every level, fastest first (whether or not this CPU has it).
    pub const ALL: [Isa; 5] = [
        Isa::Avx512Fp16,
        Isa::Avx512Bf16,
        Isa::Avx512,
        Isa::Avx2,
        Isa::Portable,
    ];

    /// Whether this CPU can run kernels of this instruction set.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Fp16 => {
                Isa::Avx512.available()
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512fp16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                Isa::Avx512.available()
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Fp16 => "AVX-512 FP16",
            Isa::Avx512Bf16 => "AVX-512 BF16",
            Isa::Avx512 => "AVX-512",
            Isa::Avx2 => "AVX2+FMA",
            Isa::Portable if cfg!(target_arch = "aarch64") => "NEON (portable)",
            Isa::Portable => "portable",
        }
    }

    /// The name on command lines: `avx512fp16`, `avx512bf16`, `avx512`, `avx2`, `portable`.
    pub fn flag(self) -> &'static str {
        match self {
            Isa::Avx512Fp16 => "avx512fp16",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Isa, String> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.flag().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = Isa::ALL.iter().map(|i| i.flag()).collect();
                format!(
                    "unknown instruction set {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The CPU's model name from /proc/cpuinfo, where the OS has one.
pub(crate) fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::Isa;

    #[test]
    fn flags_parse_back_and_unknown_names_are_named() {
        for isa in Isa::ALL {
            assert_eq!(isa.flag().parse::<Isa>(), Ok(isa));
        }
        let err = "avx9".parse::<Isa>().unwrap_err();
        assert!(
            err.contains("\"avx9\"") && err.contains("avx512bf16"),
            "{err}"
        );
        // The detected level is one this CPU runs, and the portable one always is.
        assert!(Isa::detect().available() && Isa::Portable.available());
        assert!(Isa::all_available().contains(&Isa::detect()));
        // The vdpbf16ps tiles are never picked by themselves (slower than f32 where measured).
        assert_ne!(Isa::detect(), Isa::Avx512Bf16);
        if Isa::Avx512Fp16.available() {
            assert_eq!(Isa::detect(), Isa::Avx512Fp16);
        }
    }
}
