//! The host-memory budget: a run's buffers are sized before anything is allocated, so an
//! absurd shape is a clear error naming the size instead of an allocation abort.

use super::CliResult;
use flashattn::{AttentionSpec, Pass};

/// Checks that `bytes` of host memory for `what` fit: under the available memory where the
/// system says (Linux's MemAvailable), and in any case accepted by the allocator.
pub fn check(what: &str, bytes: u128) -> CliResult<()> {
    let refuse = |limit: String| {
        format!(
            "{what} need about {} of host memory{limit}; choose smaller sizes",
            human(bytes)
        )
    };
    if let Some(available) = available_bytes() {
        if bytes > available as u128 {
            return Err(refuse(format!(
                ", but {} is available",
                human(available as u128)
            )));
        }
    }
    let n = usize::try_from(bytes).map_err(|_| refuse(String::new()))?;
    // Reserved and released at once: a probe of the allocator, not an allocation we use.
    Vec::<u8>::new()
        .try_reserve_exact(n)
        .map_err(|_| refuse(", more than the allocator gives".into()))
}

/// Rough bytes a `run` of `pass` holds at once: inputs and results in their dtypes, f32
/// copies for conversion, and with `check` the f64 reference's copies of both.
pub fn run_bytes(spec: &AttentionSpec, pass: Pass, check: bool) -> u128 {
    let Ok(c) = spec.validate() else { return 0 };
    let s = c.sizes;
    let n = |x: usize| x as u128;
    let es = n(spec.dtype.size_bytes());
    let inputs = n(s.q) + n(s.k) + n(s.v) + n(s.k_new) + n(s.v_new);
    let results = match pass {
        // out and dout, dq, dk, dv
        Pass::Backward => 2 * n(s.out) + n(s.q) + n(s.k) + n(s.v),
        _ => n(s.out),
    };
    let held = (inputs + results) * (es + 4) + n(s.lse) * 4;
    let reference = if check {
        (inputs + results + n(s.lse)) * 8
    } else {
        0
    };
    held + reference
}

/// Bytes a benchmark's backend holds for `pass` of `spec`: inputs, outputs and, for the
/// backward, the gradients, in the spec's dtype.
pub fn bench_bytes(spec: &AttentionSpec, pass: Pass) -> u128 {
    let Ok(c) = spec.validate() else { return 0 };
    let s = c.sizes;
    let n = |x: usize| x as u128;
    let tensors = match pass {
        Pass::Backward => 2 * (n(s.q) + n(s.k) + n(s.v) + 2 * n(s.out)),
        _ => n(s.q) + n(s.k) + n(s.v) + n(s.k_new) + n(s.v_new) + n(s.out),
    };
    tensors * n(spec.dtype.size_bytes()) + n(s.lse) * 4
}

/// The memory available for new allocations, where the system says.
fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` in B, KiB, MiB, GiB or TiB.
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}
