//! Element types of the attention inputs.

use std::fmt;
use std::str::FromStr;

/// The element type of q, k and v. Accumulation is always f32 (f64 in the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
    /// FP8 e4m3 with per-(batch, kv-head) descales; CUDA on Hopper only. Output is bf16.
    Fp8E4m3,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::Bf16, DType::Fp8E4m3];

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::Fp8E4m3 => 1,
        }
    }

    /// The element type of the output for inputs of this type.
    pub fn output(self) -> DType {
        match self {
            DType::Fp8E4m3 => DType::Bf16,
            other => other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::Fp8E4m3 => "fp8e4m3",
        }
    }

    /// Relative L2 error against the f64 reference that a correct kernel stays under.
    pub fn tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-4,
            DType::F16 => 1e-2,
            DType::Bf16 => 2e-2,
            DType::Fp8E4m3 => 8e-2,
        }
    }

    /// Largest absolute LSE error a correct kernel stays under. LSE is an f32 log of f32 sums,
    /// so its error is small for every dtype; the bound scales with the output tolerance.
    pub fn lse_tolerance(self) -> f64 {
        (self.tolerance() * 10.0).max(1e-3)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            "fp8" | "fp8e4m3" | "e4m3" => Ok(DType::Fp8E4m3),
            _ => Err(format!(
                "unknown dtype '{s}' (expected f32, f16, bf16 or fp8e4m3)"
            )),
        }
    }
}
