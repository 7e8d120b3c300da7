// Decode against a KV cache (FlashAttention's flash_attn_with_kvcache): where a sequence's
// positions live in the cache buffers, and the rotary embedding of q and the new k. Mirrors
// core's `KvCache::row` and the reference's rotation.

// Cache row of position pos of sequence b (a contiguous cache is one page per sequence).
fn cache_row(b: u32, pos: u32) -> u32 {
    let page = tables[p.tab_pages + b * p.max_blocks + pos / p.page_size];
    return page * p.page_size + pos % p.page_size;
}

// Index of the partner of element e (< rotary_dim) in its rotation pair.
fn rotary_partner(e: u32) -> u32 {
    let half = p.rotary_dim / 2u;
    if has_flag(FLAG_ROTARY_INTERLEAVED) {
        return e ^ 1u;
    }
    return select(e - half, e + half, e < half);
}

// Element e (< rotary_dim) of a head rotated at position seqlens[b] + at, given its partner:
// pair (x, y) becomes (x cos - y sin, x sin + y cos). The host uploads the tables' rows from
// each sequence's seqlen on, p.rotary_span of them.
fn rotate_elem(x: f32, partner: f32, e: u32, b: u32, at: u32) -> f32 {
    let half = p.rotary_dim / 2u;
    var pair = e / 2u;
    var first = (e & 1u) == 0u;
    if !has_flag(FLAG_ROTARY_INTERLEAVED) {
        first = e < half;
        pair = select(e - half, e, first);
    }
    let i = (b * p.rotary_span + at) * half + pair;
    let cos = bitcast<f32>(tables[p.tab_cos + i]);
    let sin = bitcast<f32>(tables[p.tab_cos + p.batch * p.rotary_span * half + i]);
    if first {
        return x * cos - partner * sin;
    }
    return partner * sin + x * cos;
}
