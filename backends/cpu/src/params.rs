//! Block sizes: the measured defaults, the choice per problem, and the `FLASHATTN_CPU_BLOCKS`
//! / `FLASHATTN_CPU_BWD_BLOCKS` overrides (checked and capped: an override can never make a
//! scratch size overflow).

use flashattn_core::CheckedSpec;
use std::sync::OnceLock;

/// Granularity of the forward's query block: a multiple of every ISA's vector width and P·V
/// tile height.
pub(crate) const BLOCK_M_STEP: usize = 48;
/// Largest forward query block. Every task streams its head's whole K and V once, so large
/// blocks cut that traffic (with flashattn's [b, s, h, d] layout those rows lie a page apart
/// and cost more than the arithmetic suggests). Measured on the 2-core AVX-512 box at
/// [1, 8, 2048, 64/128]: 192 beat 48 and 96 clearly, 384 beat 192 by ~2-13% (CPU-time).
const BLOCK_M_MAX: usize = 384;
/// Largest forward query block under a causal or window mask: smaller blocks waste less along
/// the diagonal and balance better (measured: 192 beat 384 by ~10-20% causal at 2048).
const BLOCK_M_MAX_MASKED: usize = 192;
/// Keys per forward block (measured: 128 beat 32, 64 and 256 with 192-row blocks).
const BLOCK_N: usize = 128;

/// Backward: keys per task (their dk / dv accumulators stay in L2 across the query blocks)
/// and queries per inner step (its Q, dO and the two score blocks stay in L1/L2). 144 keys
/// are three whole 48-key Q·K^T tiles and 24 whole 6-key dK / dV tiles (measured: 144 beat
/// 128 in 6 of 6 paired rounds at d = 64, median +9% GFLOP per CPU-s; +7% at d = 128).
const BWD_BLOCK_N: usize = 144;
const BWD_BLOCK_M: usize = 96;
/// Keys per backward task on the f16 tiles (`backward_lowp.rs`): whole 32-key f16
/// registers (144 would pad S and dP to 160 columns). 128, 160 and 192 measured alike at
/// d 64 (3 noisy rounds each, PERF_NOTES.md).
const BWD_BLOCK_N_F16: usize = 128;

/// Upper bounds of an override: far above any useful size, small enough that every scratch
/// product (at most `block_m * block_n` and `block * MAX_HEAD_DIM` floats per worker) is a
/// few MiB and cannot overflow.
pub(crate) const MAX_BLOCK_M: usize = 2016;
pub(crate) const MAX_BLOCK_N: usize = 2048;

/// Query rows (`block_m`) and keys (`block_n`) of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Blocks {
    pub block_m: usize,
    pub block_n: usize,
}

/// The forward's blocks for `spec` on `threads` threads (the override, if set and valid).
pub(crate) fn forward_blocks(spec: &CheckedSpec<'_>, threads: usize) -> Blocks {
    static OVERRIDE: OnceLock<Option<Blocks>> = OnceLock::new();
    let o = OVERRIDE.get_or_init(|| env_override("FLASHATTN_CPU_BLOCKS"));
    o.unwrap_or_else(|| Blocks {
        block_m: forward_block_m(spec, threads),
        block_n: BLOCK_N,
    })
}

/// The backward's blocks, on the f16 tiles or not (the override, if set and valid).
pub(crate) fn backward_blocks(f16_tiles: bool) -> Blocks {
    static OVERRIDE: OnceLock<Option<Blocks>> = OnceLock::new();
    let o = OVERRIDE.get_or_init(|| env_override("FLASHATTN_CPU_BWD_BLOCKS"));
    o.unwrap_or(Blocks {
        block_m: BWD_BLOCK_M,
        block_n: if f16_tiles {
            BWD_BLOCK_N_F16
        } else {
            BWD_BLOCK_N
        },
    })
}

/// The forward's query block: as large as BLOCK_M_MAX (BLOCK_M_MAX_MASKED under a mask), but
/// no larger than the longest sequence needs, and small enough to give every thread a few tasks.
fn forward_block_m(spec: &CheckedSpec<'_>, threads: usize) -> usize {
    let max_m = if spec.mask.is_masked() {
        BLOCK_M_MAX_MASKED
    } else {
        BLOCK_M_MAX
    };
    let cap = spec
        .sizes
        .max_q_len
        .div_ceil(BLOCK_M_STEP)
        .clamp(1, max_m / BLOCK_M_STEP)
        * BLOCK_M_STEP;
    let count = |block_m: usize| -> usize {
        let blocks: usize = (0..spec.batch)
            .map(|b| spec.seq(b).q_len.div_ceil(block_m))
            .sum();
        blocks.saturating_mul(spec.heads_q)
    };
    let mut block_m = cap;
    while block_m > BLOCK_M_STEP && count(block_m) < 2 * threads {
        block_m -= BLOCK_M_STEP;
    }
    block_m
}

/// Reads an override variable once; an invalid value is ignored with a logged reason.
fn env_override(var: &str) -> Option<Blocks> {
    let value = std::env::var(var).ok()?;
    match parse_blocks(&value) {
        Ok(b) => Some(b),
        Err(reason) => {
            log::warn!("flashattn-cpu: ignoring {var}={value:?}: {reason}");
            None
        }
    }
}

/// Parses `block_m,block_n`: block_m a multiple of 48 in 48..=2016, block_n in 1..=2048.
pub(crate) fn parse_blocks(value: &str) -> Result<Blocks, String> {
    let (m, n) = value
        .split_once(',')
        .ok_or("expected two numbers `block_m,block_n`")?;
    let number = |name: &str, s: &str, max: usize| -> Result<usize, String> {
        let x: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("{name} {s:?} is not a whole number"))?;
        if x == 0 || x > max {
            return Err(format!("{name} {x} is outside 1..={max}"));
        }
        Ok(x)
    };
    let block_m = number("block_m", m, MAX_BLOCK_M)?;
    let block_n = number("block_n", n, MAX_BLOCK_N)?;
    if !block_m.is_multiple_of(BLOCK_M_STEP) {
        return Err(format!(
            "block_m {block_m} is not a multiple of {BLOCK_M_STEP}"
        ));
    }
    Ok(Blocks { block_m, block_n })
}

/// `n` floats rounded up to an odd number of 64-byte lines. The tiles walk Qt, S^T and V
/// down their columns; with a stride of an even number of lines (384 floats = 24 lines,
/// 128 floats = 8) those columns fall into a fraction of L1's 64 sets and evict each other
/// (at 384 x 128: the 48-query Qt slice and the 128 x 64 V chunk each need 16 ways of a
/// 12-way L1). An odd stride spreads them over every set.
pub(crate) fn odd_lines(n: usize) -> usize {
    let lines = n.div_ceil(16);
    (lines | 1) * 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_checked_and_capped() {
        assert_eq!(
            parse_blocks("96, 64"),
            Ok(Blocks {
                block_m: 96,
                block_n: 64
            })
        );
        assert_eq!(
            parse_blocks("2016,2048"),
            Ok(Blocks {
                block_m: 2016,
                block_n: 2048
            })
        );
        // The value from the bug report: its product wrapped and the tiles wrote past their buffer.
        for bad in [
            "48,384307168202282326",
            "48,18446744073709551615",
            "18446744073709551600,128",
            "2064,128",
            "48,2049",
            "0,128",
            "48,0",
            "47,128",
            "-48,128",
            "48",
            "48,128,1",
            "",
            "a,b",
        ] {
            let r = parse_blocks(bad);
            assert!(r.is_err(), "{bad:?} was accepted: {r:?}");
        }
        let e = parse_blocks("48,384307168202282326").unwrap_err();
        assert!(e.contains("block_n") && e.contains("2048"), "{e}");
    }

    #[test]
    fn odd_lines_pads_to_an_odd_line_count() {
        assert_eq!(odd_lines(384), 400);
        assert_eq!(odd_lines(128), 144);
        assert_eq!(odd_lines(48), 48);
        assert_eq!(odd_lines(1), 16);
    }
}
