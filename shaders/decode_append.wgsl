// Decode: appends the new k / v rows of sequences [append_b0, append_b1) to the KV cache in
// place, at positions seqlens[b].., k rotated at those positions (rotary_dim > 0). One
// invocation per element of the new rows; only the new rows move. bf16 caches pack two
// elements per word, and a row's first or last word may hold an element of a neighbouring
// row, so bf16 stores are atomic and / or on the element's half word.
//
// The host prepends params.wgsl, mask.wgsl, score_mod.wgsl, the dtype file and kv_cache.wgsl.

@group(0) @binding(1) var<storage, read> k_new: array<Elem>;
@group(0) @binding(2) var<storage, read> v_new: array<Elem>;
//#if PACKED
@group(0) @binding(3) var<storage, read_write> k_cache: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<atomic<u32>>;
//#else
@group(0) @binding(3) var<storage, read_write> k_cache: array<Elem>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<Elem>;
//#endif

fn ld_k_new(i: u32) -> f32 { return elem_get(k_new[elem_word(i)], i); }
fn ld_v_new(i: u32) -> f32 { return elem_get(v_new[elem_word(i)], i); }

fn store(is_v: bool, i: u32, x: f32) {
//#if PACKED
    let shift = (i & 1u) * 16u;
    let keep = ~(0xffffu << shift);
    let bits = to_bf16(x) << shift;
    if is_v {
        atomicAnd(&v_cache[i >> 1u], keep);
        atomicOr(&v_cache[i >> 1u], bits);
    } else {
        atomicAnd(&k_cache[i >> 1u], keep);
        atomicOr(&k_cache[i >> 1u], bits);
    }
//#else
    if is_v {
        v_cache[i] = elem_of(x);
    } else {
        k_cache[i] = elem_of(x);
    }
//#endif
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    // Rows (token, KV head) per sequence, and the elements of this dispatch's k rows.
    let per_seq = p.seqlen_new * p.heads_kv;
    let rows = (p.append_b1 - p.append_b0) * per_seq;
    let is_v = idx >= rows * p.d;
    let i = select(idx, idx - rows * p.d, is_v);
    let width = select(p.d, p.dv, is_v);
    if i >= rows * width {
        return;
    }
    let e = i % width;
    let r = i / width;
    let h = r % p.heads_kv;
    let t = (r / p.heads_kv) % p.seqlen_new;
    let b = p.append_b0 + r / per_seq;
    let src = ((b * p.seqlen_new + t) * p.heads_kv + h) * width + e;
    let dst = (cache_row(b, tables[p.tab_seqlens + b] + t) * p.heads_kv + h) * width;
    if is_v {
        store(true, dst + e, ld_v_new(src));
        return;
    }
    var x = ld_k_new(src);
    if e < p.rotary_dim {
        x = rotate_elem(x, ld_k_new(src - e + rotary_partner(e)), e, b, t);
    }
    store(false, dst + e, x);
}
