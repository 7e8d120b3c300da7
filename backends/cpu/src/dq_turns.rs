//! The backward's deterministic dq sum: each (batch, query head, query block) has a turn
//! counter naming the key block that adds into its dq rows next, so the sum runs in key-block
//! order whatever the thread count (see backward.rs).

use crate::params::Blocks;
use flashattn_core::CheckedSpec;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whose turn it is to add into the dq rows of each (batch, query head, query block).
pub(crate) struct Turns {
    /// Index of the first query block of each sequence.
    first_block: Vec<usize>,
    heads_q: usize,
    /// The key block that adds next.
    next: Vec<AtomicUsize>,
}

impl Turns {
    /// Each counter starts at the first key block that sees its query block.
    pub fn new(spec: &CheckedSpec<'_>, blocks: Blocks) -> Turns {
        let (mut first_block, mut next) = (Vec::with_capacity(spec.batch), Vec::new());
        for b in 0..spec.batch {
            let s = spec.seq(b);
            first_block.push(next.len() / spec.heads_q);
            for q0 in (0..s.q_len).step_by(blocks.block_m) {
                let rows = q0..(q0 + blocks.block_m).min(s.q_len);
                let keys = spec.mask.keys_of_rows(rows, s.q_len, s.k_len);
                let kb = keys.start / blocks.block_n;
                next.extend((0..spec.heads_q).map(|_| AtomicUsize::new(kb)));
            }
        }
        Turns {
            first_block,
            heads_q: spec.heads_q,
            next,
        }
    }

    fn counter(&self, b: usize, h: usize, qb: usize) -> &AtomicUsize {
        &self.next[(self.first_block[b] + qb) * self.heads_q + h]
    }

    /// Waits until key block `kb` may add into (b, h, qb). Spins briefly, then yields (the
    /// turn's holder may be descheduled on a loaded machine).
    pub fn wait(&self, b: usize, h: usize, qb: usize, kb: usize) {
        let c = self.counter(b, h, qb);
        let mut spins = 0u32;
        while c.load(Ordering::Acquire) != kb {
            if spins < 64 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    pub fn pass(&self, b: usize, h: usize, qb: usize, kb: usize) {
        self.counter(b, h, qb).store(kb + 1, Ordering::Release);
    }
}
