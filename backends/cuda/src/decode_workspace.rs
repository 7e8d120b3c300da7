//! The device buffers of a decode call beside the caller's tensors: the backend's own
//! [`Workspace`] (tables uploaded from the spec, scratch it allocates), or one scratch
//! allocation the caller owns, laid out by [`scratch_layout`], so that a call on device tables
//! allocates nothing and need not wait for its kernels.

use crate::decode::{DecodePlan, DecodePointers};
use crate::device::{drv_err, DevBuf};
use cudarc::driver::result as drv;
use flashattn_core::Result;

/// Byte offsets of the rotated q, the partial outputs and the partial LSEs in one scratch
/// allocation, and its size: each part 16-byte aligned (the rotated q goes by 16-byte copies),
/// absent parts 0 bytes.
pub fn scratch_layout(plan: &DecodePlan) -> ([usize; 3], usize) {
    let parts = [
        plan.q_rot * plan.variant.dtype.size_bytes(),
        plan.part_out * 4,
        plan.part_lse * 4,
    ];
    let mut offsets = [0; 3];
    let mut end = 0usize;
    for (o, bytes) in offsets.iter_mut().zip(parts) {
        *o = end;
        end += bytes.next_multiple_of(16);
    }
    (offsets, end)
}

/// `base` with the scratch pointers in the caller's allocation at `ptr` (laid out by
/// [`scratch_layout`]; a part the plan does not need stays 0).
pub(crate) fn scratch_in(plan: &DecodePlan, ptr: u64, mut base: DecodePointers) -> DecodePointers {
    let (offsets, _) = scratch_layout(plan);
    let at = |needed: usize, o: usize| if needed > 0 { ptr + o as u64 } else { 0 };
    base.q_rot = at(plan.q_rot, offsets[0]);
    base.part_out = at(plan.part_out, offsets[1]);
    base.part_lse = at(plan.part_lse, offsets[2]);
    base
}

/// Device buffers beside the caller's tensors: the tables and the scratch of a call. A handle
/// keeps one across steps (buffers grow when a step needs more, else are reused).
#[derive(Default)]
pub(crate) struct Workspace {
    bufs: [Option<DevBuf>; 9],
}

impl Workspace {
    /// A buffer of at least `bytes` in slot `i` (0 when `bytes` is 0), holding `data` if given.
    pub(crate) fn slot(&mut self, i: usize, bytes: usize, data: Option<&[u8]>) -> Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        if self.bufs[i].as_ref().is_none_or(|b| b.bytes < bytes) {
            self.bufs[i] = None; // free before allocating the larger one
            self.bufs[i] = Some(DevBuf::alloc(bytes)?);
        }
        let ptr = self.bufs[i].as_ref().map_or(0, |b| b.ptr);
        if let Some(data) = data {
            // SAFETY: the buffer holds at least `bytes` = data.len() bytes.
            unsafe { drv::memcpy_htod_sync(ptr, data) }.map_err(drv_err("cuMemcpyHtoD"))?;
        }
        Ok(ptr)
    }

    /// Uploads `plan`'s tables and sizes its scratch, except where `base` already has a
    /// pointer (the caller's device copies); returns `base` with the workspace's filled in.
    pub fn prepare(
        &mut self,
        plan: &DecodePlan,
        mut base: DecodePointers,
    ) -> Result<DecodePointers> {
        let t = &plan.tables;
        let bytes = |v: &[i32]| bytemuck::cast_slice::<i32, u8>(v).to_vec();
        let floats = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        let uploads: [(usize, &mut u64, Vec<u8>); 6] = [
            (0, &mut base.seqlens, bytes(&t.seqlens)),
            (1, &mut base.block_table, bytes(&t.block_table)),
            (2, &mut base.batch_idx, bytes(&t.batch_idx)),
            (3, &mut base.rot_cos, floats(&t.rot_cos)),
            (4, &mut base.rot_sin, floats(&t.rot_sin)),
            (5, &mut base.alibi, floats(&t.alibi)),
        ];
        for (i, ptr, data) in uploads {
            if *ptr == 0 {
                *ptr = self.slot(i, data.len(), Some(&data))?;
            }
        }
        let scratch = [
            (
                6,
                &mut base.q_rot,
                plan.q_rot * plan.variant.dtype.size_bytes(),
            ),
            (7, &mut base.part_out, plan.part_out * 4),
            (8, &mut base.part_lse, plan.part_lse * 4),
        ];
        for (i, ptr, bytes) in scratch {
            if *ptr == 0 {
                *ptr = self.slot(i, bytes, None)?;
            }
        }
        Ok(base)
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bufs.iter().flatten().map(|b| b.bytes as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_plan_from_bounds, select_decode};
    use crate::tiles::smem_optin_of_arch;
    use crate::variants::KernelKind;
    use flashattn_core::testing::decode::{contiguous, rotary, spec};
    use flashattn_core::DType;

    fn plan(s: &flashattn_core::AttentionSpec) -> DecodePlan {
        let c = s.validate().unwrap();
        let smem = smem_optin_of_arch("sm_80");
        let v = select_decode(&c, (8, 0), smem, KernelKind::DecodeMma).unwrap();
        decode_plan_from_bounds(&c, &v, 108).unwrap()
    }

    #[test]
    fn a_caller_scratch_holds_each_part_at_its_offset_and_only_the_parts_needed() {
        let cache = contiguous(&[2000], 1, 0).rotary(rotary(64, 2001, false));
        let p = plan(&spec(8, 2, 1, 128, cache).dtype(DType::Bf16));
        assert!(p.q_rot > 0 && p.part_out > 0, "rotary and several chunks");
        let (offsets, _) = scratch_layout(&p);
        let ptrs = scratch_in(&p, 0x10_000, DecodePointers::default());
        let at = |o: usize| 0x10_000 + o as u64;
        assert_eq!(
            [ptrs.q_rot, ptrs.part_out, ptrs.part_lse],
            [at(offsets[0]), at(offsets[1]), at(offsets[2])]
        );
        assert_ne!(ptrs.part_out, ptrs.part_lse);
        // No rotary, one chunk: nothing in the scratch.
        let p = plan(&spec(8, 2, 1, 64, contiguous(&[100; 64], 0, 0)).dtype(DType::F16));
        let ptrs = scratch_in(&p, 0x10_000, DecodePointers::default());
        assert_eq!([ptrs.q_rot, ptrs.part_out, ptrs.part_lse], [0, 0, 0]);
    }
}
