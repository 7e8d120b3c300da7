//! The causal / sliding-window mask: which keys a query row sees, which key blocks a query
//! block walks (forward), and the inverse, which query rows see a key (backward).
//!
//! FlashAttention's rule, bottom-right aligned: with `diag = i + k_len - q_len`, key `j` is
//! visible from query row `i` iff `diag - left <= j <= diag + right`, where an absent bound is
//! unbounded and causal sets `right = 0`. Every visible range is contiguous, and both of its
//! ends grow with `i` (and the query range with `j`), which is what makes block skipping exact.
//!
//! Arithmetic is done in i128 so that any window a user can write (up to `i64::MAX`) stays
//! exact; the test oracle does not use this module (it tests every pair itself).

use std::ops::Range;

/// The folded causal + window mask of one problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mask {
    /// Keys visible left of the diagonal; `None` is unbounded.
    pub left: Option<u64>,
    /// Keys visible right of the diagonal; `None` is unbounded (causal is `Some(0)`).
    pub right: Option<u64>,
}

impl Mask {
    /// The mask of `window = (left, right)` (-1 unbounded) and `causal`. A bound at least
    /// `unbounded_from` (the longest sequence a row can see, plus the query length) hides
    /// nothing and is dropped, so kernels never see huge window values.
    pub fn new(window: (i64, i64), causal: bool, unbounded_from: u64) -> Mask {
        let bound = |w: i64| (w >= 0 && (w as u64) < unbounded_from).then_some(w as u64);
        Mask {
            left: bound(window.0),
            right: if causal { Some(0) } else { bound(window.1) },
        }
    }

    /// Whether any key can be hidden (before looking at sizes).
    pub fn is_masked(&self) -> bool {
        self.left.is_some() || self.right.is_some()
    }

    /// Visible keys of query row `i` in a sequence of `q_len` queries and `k_len` keys; empty
    /// (`start >= end`) when the row is fully masked.
    pub fn keys(&self, i: usize, q_len: usize, k_len: usize) -> Range<usize> {
        let diag = i as i128 + k_len as i128 - q_len as i128;
        let k = k_len as i128;
        let lo = self.left.map_or(0, |l| (diag - l as i128).clamp(0, k));
        let hi = self.right.map_or(k, |r| (diag + r as i128 + 1).clamp(0, k));
        lo as usize..(hi.max(lo)) as usize
    }

    /// Keys seen by any row of `rows` (a contiguous range, since both ends grow with the row).
    pub fn keys_of_rows(&self, rows: Range<usize>, q_len: usize, k_len: usize) -> Range<usize> {
        // Rows with any visible key are a suffix of the sequence: [q_len - k_len - right, q_len).
        let first_visible = match self.right {
            Some(r) => (q_len as i128 - k_len as i128 - r as i128).clamp(0, q_len as i128) as usize,
            None => 0,
        };
        let first = rows.start.max(first_visible);
        let end = rows.end.min(q_len);
        if k_len == 0 || first >= end {
            return 0..0;
        }
        self.keys(first, q_len, k_len).start..self.keys(end - 1, q_len, k_len).end
    }

    /// The same mask seen from the keys: query and key swap roles, so the left and right
    /// bounds swap. `transposed().keys(j, k_len, q_len)` are the rows that see key `j`.
    fn transposed(&self) -> Mask {
        Mask {
            left: self.right,
            right: self.left,
        }
    }

    /// Query rows that see key `j` (the inverse of [`keys`](Self::keys)).
    pub fn rows(&self, j: usize, q_len: usize, k_len: usize) -> Range<usize> {
        if j >= k_len {
            return 0..0;
        }
        self.transposed().keys(j, k_len, q_len)
    }

    /// Query rows that see any key of `keys` (what a backward key block walks).
    pub fn rows_of_keys(&self, keys: Range<usize>, q_len: usize, k_len: usize) -> Range<usize> {
        self.transposed().keys_of_rows(keys, k_len, q_len)
    }

    /// Number of visible (query, key) pairs of one sequence, in closed form.
    pub fn visible_pairs(&self, q_len: usize, k_len: usize) -> u128 {
        let (q, k) = (q_len as i128, k_len as i128);
        let c = k - q;
        let hi = match self.right {
            Some(r) => sum_clamped(c + r as i128 + 1, q, k),
            None => q * k,
        };
        let lo = match self.left {
            Some(l) => sum_clamped(c - l as i128, q, k),
            None => 0,
        };
        (hi - lo).max(0) as u128
    }
}

/// Block indices `[first, last]` of size `block` that cover `range` (empty for an empty range).
pub fn blocks(range: Range<usize>, block: usize) -> Range<usize> {
    if range.is_empty() || block == 0 {
        return 0..0;
    }
    range.start / block..range.end.div_ceil(block)
}

/// `sum_{i=0}^{n-1} clamp(a + i, 0, k)`, in closed form.
fn sum_clamped(a: i128, n: i128, k: i128) -> i128 {
    if n <= 0 {
        return 0;
    }
    // i below i0 gives 0, i from i1 on gives k, in between a + i.
    let i0 = (-a).clamp(0, n);
    let i1 = (k - a).clamp(i0, n);
    let linear = (i1 - i0) * (2 * a + i0 + i1 - 1) / 2;
    linear + (n - i1) * k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair tested directly: the definition the helpers must match.
    fn visible(m: &Mask, i: usize, j: usize, q: usize, k: usize) -> bool {
        let diag = i as i128 + k as i128 - q as i128;
        let j = j as i128;
        m.left.is_none_or(|l| j >= diag - l as i128)
            && m.right.is_none_or(|r| j <= diag + r as i128)
    }

    fn masks() -> Vec<Mask> {
        let mut v = Vec::new();
        for l in [None, Some(0), Some(1), Some(3), Some(17)] {
            for r in [None, Some(0), Some(2), Some(9)] {
                v.push(Mask { left: l, right: r });
            }
        }
        v
    }

    /// Whether `got` holds exactly the indices `0..n` where `want` holds.
    fn agrees(got: Range<usize>, n: usize, want: impl Fn(usize) -> bool) -> bool {
        (0..n).all(|x| got.contains(&x) == want(x))
    }

    #[test]
    fn ranges_match_the_definition() {
        for m in masks() {
            for (q, k) in [(1, 1), (5, 5), (7, 3), (3, 11), (20, 20), (9, 1)] {
                let vis = |i: usize, j: usize| visible(&m, i, j, q, k);
                let at = format!("{m:?} q{q} k{k}");
                let pairs = (0..q).map(|i| (0..k).filter(|&j| vis(i, j)).count() as u128);
                assert_eq!(m.visible_pairs(q, k), pairs.sum(), "{at}");
                for i in 0..q {
                    assert!(agrees(m.keys(i, q, k), k, |j| vis(i, j)), "{at} row {i}");
                }
                for j in 0..k {
                    assert!(agrees(m.rows(j, q, k), q, |i| vis(i, j)), "{at} key {j}");
                }
                // The keys some row of `a..b` sees, and the rows that see some key of `a..b`.
                type Union = fn(&Mask, Range<usize>, usize, usize) -> Range<usize>;
                let unions: [(Union, usize, usize, bool); 2] = [
                    (Mask::keys_of_rows, q, k, false),
                    (Mask::rows_of_keys, k, q, true),
                ];
                for (union, len, other, by_keys) in unions {
                    // x: an index of `a..b`, y: one the union may hold.
                    let sees = |x, y| if by_keys { vis(y, x) } else { vis(x, y) };
                    for a in 0..len {
                        for b in a..=len {
                            let any = |y| (a..b).any(|x| sees(x, y));
                            let got = union(&m, a..b, q, k);
                            assert!(agrees(got, other, any), "{at} {a}..{b} by keys {by_keys}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_windows_are_unbounded() {
        let m = Mask::new((-1, i64::MAX), false, 100);
        assert_eq!(m, Mask::default());
        let m = Mask::new((i64::MAX, 0), false, 100);
        assert_eq!(
            m,
            Mask {
                left: None,
                right: Some(0)
            }
        );
        // Even unfolded, huge bounds do not overflow.
        let m = Mask {
            left: Some(u64::MAX),
            right: Some(u64::MAX),
        };
        assert_eq!(m.keys(0, 10, 10), 0..10);
        assert_eq!(m.rows(3, 10, 10), 0..10);
        assert_eq!(m.visible_pairs(10, 10), 100);
    }

    #[test]
    fn visible_pairs_is_closed_form_at_huge_sizes() {
        let causal = Mask {
            left: None,
            right: Some(0),
        };
        let n = 100_000_000_000usize;
        assert_eq!(
            causal.visible_pairs(n, n),
            (n as u128) * (n as u128 + 1) / 2
        );
    }

    #[test]
    fn blocks_cover_the_range() {
        assert_eq!(blocks(0..0, 64), 0..0);
        assert_eq!(blocks(0..1, 64), 0..1);
        assert_eq!(blocks(63..65, 64), 0..2);
        assert_eq!(blocks(128..256, 64), 2..4);
    }
}
