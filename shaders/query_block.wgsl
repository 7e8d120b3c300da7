// The query block of a workgroup of the forward and dQ kernels (grid: query blocks of
// BLOCK_M rows x query heads x sequences * p.num_splits) and the query row of an invocation:
// which rows and keys it walks in this dispatch. Decode (FLAG_CACHE) packs the query heads of
// one KV head into the block instead (grid: blocks of BLOCK_M packed rows x KV heads x
// sequences * p.num_splits; packed row i * group + g is query row i of head kh * group + g),
// so every key row staged is used by the whole group.

// This invocation's slice of its query row: slot s of invocation t is element
// 2 * (t + TPR * (s / 2)) + s % 2 (see flash_fwd.wgsl).
var<private> q_slice: array<f32, DS>;

// One workgroup's work in this dispatch (uniform across the workgroup).
struct Block {
    b: u32,
    h: u32,      // the query head (decode: the group's first)
    kh: u32,
    split: u32,
    seq: SeqBounds,
    pack: u32,   // packed rows per query row: 1, decode the group size
    row0: u32,   // first packed row
    rows: Span,  // the query rows (within the sequence) its packed rows belong to
    keys: Span,  // the keys it walks: seen by its rows, bound in this dispatch, in its slice
}

// One invocation's query row.
struct Row {
    b: u32,
    i: u32,
    h: u32,
    tok: u32,
    ok: bool,    // a row of the sequence bound in this dispatch
    keys: Span,  // its visible keys among the block's
    diag: i32,
    slope: f32,
}

fn block_of(wid: vec3<u32>) -> Block {
    let b = wid.z / p.num_splits;
    let split = wid.z % p.num_splits;
    let seq = seq_bounds(b);
    let decode = has_flag(FLAG_CACHE);
    let pack = select(1u, p.group, decode);
    let row0 = wid.x * BLOCK_M;
    let packed_end = min(row0 + BLOCK_M, seq.q_len * pack);
    let rows = Span(i32(row0 / pack), i32((packed_end + pack - 1u) / pack));
    let ql = i32(seq.q_len);
    let kl = i32(seq.k_len);
    let bound = Span(i32(p.k_tok0) - i32(seq.k_start), i32(p.k_tok1) - i32(seq.k_start));
    let slice = i32((p.slice0 + split) * p.slice_len);
    let walked = Span(slice, slice + i32(p.slice_len));
    let keys = span_and(span_and(mask_keys_of_rows(rows, ql, kl), bound), walked);
    let h = select(wid.y, wid.y * p.group, decode);
    return Block(b, h, h / p.group, split, seq, pack, row0, rows, keys);
}

// Whether any row of the block lies in this dispatch's query tokens.
fn block_active(blk: Block) -> bool {
    let first = blk.seq.q_start + u32(blk.rows.start);
    let end = blk.seq.q_start + u32(max(blk.rows.end, blk.rows.start));
    return blk.rows.start < blk.rows.end && first < p.q_tok1 && end > p.q_tok0;
}

fn row_of(blk: Block, r: u32) -> Row {
    let i = (blk.row0 + r) / blk.pack;
    let h = blk.h + (blk.row0 + r) % blk.pack;
    let tok = blk.seq.q_start + i;
    let ok = i < blk.seq.q_len && tok >= p.q_tok0 && tok < p.q_tok1;
    let ql = i32(blk.seq.q_len);
    let kl = i32(blk.seq.k_len);
    let keys = span_and(mask_keys(i32(i), ql, kl), blk.keys);
    return Row(blk.b, i, h, tok, ok, keys, i32(i) + kl - ql, alibi_slope_log2(blk.b, h));
}

// Keys every row of the block sees (both ends of a row's range grow with the row).
fn keys_all_rows_see(blk: Block) -> Span {
    let ql = i32(blk.seq.q_len);
    let kl = i32(blk.seq.k_len);
    return Span(mask_keys(blk.rows.end - 1, ql, kl).start, mask_keys(blk.rows.start, ql, kl).end);
}

// Whether the tile of keys [kt, kt + BLOCK_N) holds a key that some row does not see: there,
// masked keys are skipped rather than multiplied by 0, so that a NaN a row does not see stays
// out of it.
fn tile_guarded(blk: Block, all_see: Span, kt: i32) -> bool {
    let tile_end = min(kt + i32(BLOCK_N), blk.keys.end);
    return kt < all_see.start || tile_end > all_see.end;
}

// Loads q_slice (zeros past d and for rows outside the dispatch); decode rotates q.
fn load_q(row: Row, h: u32, t: u32) {
    let base = at_q(row.b, row.tok, h);
    for (var s = 0u; s < DS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        var x = select(0.0, ld_q(base + e), row.ok && e < p.d);
//#if DECODE
        if row.ok && e < p.rotary_dim {
            let at = select(0u, row.i, has_flag(FLAG_ROTARY_Q_POSITIONAL));
            x = rotate_elem(x, ld_q(base + rotary_partner(e)), e, row.tok / p.seqlen_q, at);
        }
//#endif
        q_slice[s] = x;
    }
}
