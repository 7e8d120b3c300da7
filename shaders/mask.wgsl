// The causal / sliding-window mask, mirroring core/src/mask.rs (`Mask`) name for name. With
// diag = i + k_len - q_len, key j is visible from query row i iff
// diag - win_left <= j <= diag + win_right, a bound of -1 being unbounded (causal is
// win_right = 0). Every visible range is contiguous and both its ends grow with i (and the
// row range with j), which makes block skipping exact. Positions are i32: the host drops
// windows longer than the sequences and refuses sequences of 2^30 tokens or more, so no sum
// below overflows.

// Positions [start, end); empty when start >= end.
struct Span {
    start: i32,
    end: i32,
}

// Visible keys of row i for a window (left, right): `Mask::keys`. The inverse direction is the
// same function with queries and keys swapped and the bounds swapped (`Mask::transposed`).
fn window_keys(i: i32, q_len: i32, k_len: i32, left: i32, right: i32) -> Span {
    let diag = i + k_len - q_len;
    var lo = 0;
    if left >= 0 {
        lo = clamp(diag - left, 0, k_len);
    }
    var hi = k_len;
    if right >= 0 {
        hi = clamp(diag + right + 1, 0, k_len);
    }
    return Span(lo, max(hi, lo));
}

// Keys seen by any row of `rows` for a window (left, right): `Mask::keys_of_rows`.
fn window_keys_of_rows(rows: Span, q_len: i32, k_len: i32, left: i32, right: i32) -> Span {
    // Rows with any visible key are a suffix of the sequence.
    var first_visible = 0;
    if right >= 0 {
        first_visible = clamp(q_len - k_len - right, 0, q_len);
    }
    let first = max(rows.start, first_visible);
    let end = min(rows.end, q_len);
    if k_len == 0 || first >= end {
        return Span(0, 0);
    }
    let lo = window_keys(first, q_len, k_len, left, right).start;
    return Span(lo, window_keys(end - 1, q_len, k_len, left, right).end);
}

// Visible keys of query row i (`Mask::keys`).
fn mask_keys(i: i32, q_len: i32, k_len: i32) -> Span {
    return window_keys(i, q_len, k_len, p.win_left, p.win_right);
}

// Keys seen by any row of `rows` (`Mask::keys_of_rows`): what a query block walks.
fn mask_keys_of_rows(rows: Span, q_len: i32, k_len: i32) -> Span {
    return window_keys_of_rows(rows, q_len, k_len, p.win_left, p.win_right);
}

// Query rows that see key j (`Mask::rows`), the inverse of mask_keys.
fn mask_rows(j: i32, q_len: i32, k_len: i32) -> Span {
    if j >= k_len {
        return Span(0, 0);
    }
    return window_keys(j, k_len, q_len, p.win_right, p.win_left);
}

// Query rows that see any key of `keys` (`Mask::rows_of_keys`): what a backward key block walks.
fn mask_rows_of_keys(keys: Span, q_len: i32, k_len: i32) -> Span {
    return window_keys_of_rows(keys, k_len, q_len, p.win_right, p.win_left);
}

fn span_and(a: Span, b: Span) -> Span {
    return Span(max(a.start, b.start), min(a.end, b.end));
}
