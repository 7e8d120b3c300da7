//! Software prefetch for the decode kernels. In a `[rows, heads_kv, d]` cache one head's rows
//! lie `heads_kv * d` elements apart, a stride the hardware prefetcher does not follow, so
//! without this every row the kernel reads is a miss. Requests for the next block go into L2
//! a few lines at a time from inside the compute loops (`Paced`): issued in one burst, they
//! fill the line-fill buffers and stall the compute behind them, so memory and compute take
//! turns instead of overlapping.

/// Prefetch targets: L1 (and L2), or L2 only.
#[cfg(target_arch = "x86_64")]
pub(crate) use std::arch::x86_64::{_MM_HINT_T0 as L1, _MM_HINT_T1 as L2};
#[cfg(not(target_arch = "x86_64"))]
pub(crate) const L1: i32 = 0;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) const L2: i32 = 0;

/// Asks for the `n` elements at `p` to be brought into cache level `LEVEL` (a hint that
/// never faults; nothing off x86_64).
#[inline(always)]
pub(crate) fn prefetch<E, const LEVEL: i32>(p: *const E, n: usize) {
    let end = p as usize + n * std::mem::size_of::<E>();
    let mut line = p as usize & !63;
    while line < end {
        line_hint::<LEVEL>(line);
        line += 64;
    }
}

#[inline(always)]
fn line_hint<const LEVEL: i32>(addr: usize) {
    // SAFETY: a prefetch is only a hint; it never faults.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<LEVEL>(addr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Cache lines to bring into L2, issued a few per step of a compute loop.
#[derive(Default)]
pub(crate) struct Paced {
    lines: Vec<usize>,
    next: usize,
    per_step: usize,
}

impl Paced {
    /// Forgets what is left.
    pub fn clear(&mut self) {
        self.lines.clear();
        self.next = 0;
    }

    /// Queues the lines of the `n` elements at `p`.
    pub fn push<E>(&mut self, p: *const E, n: usize) {
        let end = p as usize + n * std::mem::size_of::<E>();
        self.lines.extend((p as usize & !63..end).step_by(64));
    }

    /// Spreads the queued lines over `steps` calls of `step`.
    pub fn pace(&mut self, steps: usize) {
        self.per_step = (self.lines.len() - self.next).div_ceil(steps.max(1));
    }

    #[inline(always)]
    pub fn step(&mut self) {
        let end = (self.next + self.per_step).min(self.lines.len());
        for &line in &self.lines[self.next..end] {
            line_hint::<L2>(line);
        }
        self.next = end;
    }

    /// Issues whatever is left.
    pub fn finish(&mut self) {
        self.per_step = self.lines.len();
        self.step();
    }
}
