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

// Query rows [lo, hi) that see key j (core: Mask::rows, the inverse of mask_keys): with
// base = j - (k_len - q_len), base - win_right <= i <= base + win_left. Empty for j >= k_len.
DEV void mask_rows(const Params& p, int j, int q_len, int k_len, int& lo, int& hi) {
    if (j >= k_len) {
        lo = hi = 0;
        return;
    }
    int base = j - (k_len - q_len);
    lo = p.win_right >= 0 ? min(max(base - p.win_right, 0), q_len) : 0;
    hi = p.win_left >= 0 ? min(max(base + p.win_left + 1, 0), q_len) : q_len;
    hi = max(hi, lo);
}

// Query blocks of block_m rows that see any of the keys [j0, j1) (j1 <= k_len): [m_lo, m_hi)
// (core: Mask::rows_of_keys, then mask::blocks); what a backward key block walks. Keys seen by
// any row are a suffix [k_len - q_len - win_left, k_len), and both ends of a key's row range
// grow with the key: the first seen key gives the lowest row, the last key the highest.
DEV void mask_row_blocks(const Params& p, int j0, int j1, int q_len, int k_len, int block_m, int& m_lo, int& m_hi) {
    const int first_seen = p.win_left >= 0 ? min(max(k_len - q_len - p.win_left, 0), k_len) : 0;
    const int first = max(j0, first_seen);
    m_lo = m_hi = 0;
    if (q_len == 0 || first >= j1) return;
    int lo, hi, tmp;
    mask_rows(p, first, q_len, k_len, lo, tmp);
    mask_rows(p, j1 - 1, q_len, k_len, tmp, hi);
    if (lo >= hi) return;
    m_lo = lo / block_m;
    m_hi = (hi + block_m - 1) / block_m;
}
