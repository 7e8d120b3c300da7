// The tile schedule shared by the kernels that walk (batch, head, query block) tiles, mirrored on
// the host by src/tiles.rs (decode_tile), where a test checks that every tile is visited once.
// Prepended: params.cuh.

struct Tile {
    int b, h, m_block;
};

// Tile order, chosen by the host (tiles.rs: head_major_order). Head-major: consecutive tiles
// are the query blocks of one (batch, head), last block first, so the CTAs of a wave share few
// heads and their K/V stay in L2 (ncu on an H100, d128 / 8k: block-major reached only 61% L2
// hits; head-major measured 7% faster). Block-major: every head's last block first, which
// balances causal work better (head-major measured up to 25% slower there).
DEV Tile decode_tile(const Params& p, int t) {
    // One division for both orders: t = major * minor_count + minor.
    const int per_m = p.heads_q * p.batch;
    const int minor_count = p.head_major_tiles ? p.num_m_blocks : per_m;
    const int major = t / minor_count, minor = t - major * minor_count;
    const int bh = p.head_major_tiles ? major : minor;
    Tile tile;
    tile.m_block = p.num_m_blocks - 1 - (p.head_major_tiles ? minor : major);
    tile.h = bh % p.heads_q;
    tile.b = bh / p.heads_q;
    return tile;
}
