//! The backward's block products on the f32 register tiles (`simd.rs`): f16 / bf16 inputs
//! widened (Q and dO once per call, head-major; K^T and V^T once per key block).

use crate::backward::{dk_dq_f32, load_k_rows, BlockPart, BwdProducts, Problem, Scratch, Task};
use crate::block::{self, PvTiles, QkTiles};
use crate::simd::{Simd, Tile};

/// The f32 register tiles: f16 / bf16 inputs widened (Q and dO once per call, head-major).
pub(crate) struct F32Bwd;

impl<S: Simd> BwdProducts<S> for F32Bwd {
    #[inline(always)]
    unsafe fn load_keys(p: &Problem, sc: &mut Scratch, t: Task, j0: usize, nk: usize) {
        load_key_block(p, sc, t, j0, nk);
    }
    #[inline(always)]
    unsafe fn scores(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        let (row0, ld, seen) = (part.query_row0(p), p.ld, part.seen());
        let (q, sp) = (
            p.q.as_ptr().add(row0 * p.d_pad),
            sc.s.as_mut_ptr().add(seen.start * ld),
        );
        let t = product(p.spec.head_dim, q, p.d_pad, sc.kt.as_ptr(), sp, ld);
        block::qk_product::<QkTiles<S>>(seen.len(), part.keys(), t);
    }
    #[inline(always)]
    unsafe fn dprobs(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        let (row0, ld, seen) = (part.query_row0(p), p.ld, part.seen());
        let dout = p.dout.as_ptr().add(row0 * p.dv_pad);
        let dp = sc.dp.as_mut_ptr().add(seen.start * ld);
        let t = product(p.spec.head_dim_v, dout, p.dv_pad, sc.vt.as_ptr(), dp, ld);
        block::qk_product::<QkTiles<S>>(seen.len(), part.keys(), t);
    }
    #[inline(always)]
    unsafe fn add_dv(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        let (row0, seen) = (part.query_row0(p), part.seen());
        let t = Tile {
            k: seen.len(),
            a: sc.s.as_ptr().add(seen.start * p.ld),
            a_rs: 1,
            a_cs: p.ld,
            b: p.dout.as_ptr().add(row0 * p.dv_pad),
            ldb: p.dv_pad,
            c: sc.dv.as_mut_ptr(),
            ldc: p.dv_pad,
            alpha: sc.ones.as_ptr(),
        };
        block::pv_product::<PvTiles<S>>(0..part.blk.nk, p.dv_pad, t);
    }
    #[inline(always)]
    unsafe fn dk_dq(p: &Problem, sc: &mut Scratch, part: BlockPart) {
        dk_dq_f32::<S>(p, sc, part);
    }
}

/// K rows (for dQ), K^T pre-scaled (for S) and V^T (for dP) of the task's key block.
#[inline(always)]
fn load_key_block(p: &Problem, sc: &mut Scratch, t: Task, j0: usize, nk: usize) {
    let (d, dv) = (p.spec.head_dim, p.spec.head_dim_v);
    let tok0 = p.spec.seq(t.b).k_start + j0;
    load_k_rows(p, sc, tok0, t.kv_head, nk);
    // K^T is transposed from the copy.
    let (kp, kt) = (sc.kp.as_slice(), sc.kt.as_mut_slice());
    for j in 0..nk {
        for x in 0..d {
            kt[x * p.ld + j] = kp[j * p.d_pad + x] * p.k_mul;
        }
    }
    let vt = sc.vt.as_mut_slice();
    let rows = (nk, nk);
    block::pack_transposed(
        &p.v,
        (p.v_rows.at(tok0, t.kv_head), p.v_rows.token),
        rows,
        dv,
        1.0,
        &mut sc.row,
        vt,
        p.ld,
    );
}

/// The `C = A · B` product of query rows `a` (`k` wide, row stride `a_rs`) with a transposed
/// key block `bt` into `c` (both `ld` apart).
fn product(k: usize, a: *const f32, a_rs: usize, bt: *const f32, c: *mut f32, ld: usize) -> Tile {
    Tile {
        k,
        a,
        a_rs,
        a_cs: 1,
        b: bt,
        ldb: ld,
        c,
        ldc: ld,
        alpha: std::ptr::null(),
    }
}
