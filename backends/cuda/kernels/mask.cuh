// The causal / sliding-window mask (core/src/mask.rs): with diag = i + k_len - q_len, key j is
// visible from query row i iff diag - win_left <= j <= diag + win_right (-1: unbounded; causal
// is folded in as win_right = 0 by the host). The host drops windows longer than any sequence
// (Mask::new), so the int arithmetic here cannot overflow.
// Prepended: params.cuh.

// Visible keys [lo, hi) of query row i (core: Mask::keys).
DEV void mask_keys(const Params& p, int i, int q_len, int k_len, int& lo, int& hi) {
    int diag = i + k_len - q_len;
    lo = p.win_left >= 0 ? max(diag - p.win_left, 0) : 0;
    hi = p.win_right >= 0 ? min(max(diag + p.win_right + 1, 0), k_len) : k_len;
    lo = min(lo, k_len);
}

// Key blocks of block_n keys that rows [m0, m1) can see: [n_lo, n_hi) (core: Mask::keys_of_rows,
// then mask::blocks). Both ends of a row's range grow with the row, so the first row gives the
// lowest key and the last row the highest.
DEV void mask_key_blocks(const Params& p, int m0, int m1, int q_len, int k_len, int block_n, int& n_lo,
                         int& n_hi) {
    int lo0, hi0, lo1, hi1;
    mask_keys(p, m0, q_len, k_len, lo0, hi0);
    mask_keys(p, m1 - 1, q_len, k_len, lo1, hi1);
    n_lo = lo0 / block_n;
    n_hi = hi1 > lo0 ? (hi1 + block_n - 1) / block_n : n_lo;
}
