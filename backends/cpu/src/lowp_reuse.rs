//! Packed K and V blocks of the low-precision forward, kept while a worker's tasks stay on
//! one (batch, KV head). The queue hands out a head's query blocks in order, so without this
//! every K / V block was scanned for its scale and converted once per query block: ~13% of
//! the f16-tile forward at 2048 keys (PERF_NOTES.md).

use crate::io::AlignedBuf;

/// Largest packed bytes a worker keeps (the rest of its head is packed per use): a head of
/// 4096 keys at head_dim 128, within a 2 MiB L2.
const KEEP_BYTES: usize = 2 << 20;

/// One operand's (K's or V's) packed blocks: slot `j0 / block_n` holds the block starting at
/// key `j0` while it stays valid; the last slot is scratch for blocks that are not kept.
pub(crate) struct PackedBlocks {
    /// Per slot: the (first key, keys) it holds and its packing scale.
    held: Vec<Option<(usize, usize, f32)>>,
    buf: AlignedBuf,
    /// u16 elements per slot.
    slot_len: usize,
    block_n: usize,
}

impl PackedBlocks {
    /// Room for `slot_len` u16 per block of `block_n` keys, keeping up to `keys` keys.
    pub fn new(slot_len: usize, block_n: usize, keys: usize) -> PackedBlocks {
        let keep = if slot_len == 0 {
            0
        } else {
            keys.div_ceil(block_n).min(KEEP_BYTES / (2 * slot_len))
        };
        PackedBlocks {
            held: vec![None; keep + 1],
            // u16 counts, as an f32 buffer of half the length.
            buf: AlignedBuf::zeroed(((keep + 1) * slot_len).div_ceil(2)),
            slot_len,
            block_n,
        }
    }

    /// Forgets every block (a new head).
    pub fn clear(&mut self) {
        self.held.fill(None);
    }

    /// The slot of the block from `j0`: its own, or the last (scratch, never held) for blocks
    /// past the kept ones and those off the block grid (a window's first block).
    #[inline(always)]
    fn slot(&self, j0: usize) -> usize {
        let scratch = self.held.len() - 1;
        if j0.is_multiple_of(self.block_n) {
            (j0 / self.block_n).min(scratch)
        } else {
            scratch
        }
    }

    /// Whether a slot holds the block of `nk` keys from `j0` (a `get` of it packs nothing).
    #[inline(always)]
    pub fn holds(&self, j0: usize, nk: usize) -> bool {
        matches!(self.held[self.slot(j0)], Some((j, n, _)) if (j, n) == (j0, nk))
    }

    /// The block of `nk` keys from `j0`: its packed operand and scale, packed by
    /// `pack(dst) -> scale` unless a slot still holds it.
    #[inline(always)]
    pub fn get(
        &mut self,
        j0: usize,
        nk: usize,
        pack: impl FnOnce(&mut [u16]) -> f32,
    ) -> (*const u16, f32) {
        let slot = self.slot(j0);
        let at = slot * self.slot_len;
        let ptr = self.buf.as_u16().wrapping_add(at);
        if let Some((j, n, scale)) = self.held[slot] {
            if (j, n) == (j0, nk) {
                return (ptr, scale);
            }
        }
        let dst = &mut self.buf.as_mut_u16()[at..at + self.slot_len];
        let scale = pack(dst);
        if slot + 1 < self.held.len() {
            self.held[slot] = Some((j0, nk, scale));
        }
        (ptr, scale)
    }
}
