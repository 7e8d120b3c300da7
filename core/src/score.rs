//! Score modifications between `q·k` and the softmax: scale, softcap (and its derivative, for
//! the backward pass) and ALiBi. `score(i, j) = softcap(scale * q_i·k_j) + alibi(i, j)`.
//!
//! The host-side paths (CPU backend, naive attention, web demo heatmap) use these; the
//! kernels (WGSL `score_mod.wgsl`, CUDA `score_mod.cuh`) mirror them. The f64 reference writes
//! the definition out itself, so that it does not share the code it checks.

use crate::AttentionSpec;

/// The score modification of one (batch, query head).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreMod {
    pub scale: f32,
    /// `c` in `c * tanh(s / c)`; 0 is off.
    pub softcap: f32,
    /// ALiBi slope; 0 is off.
    pub slope: f32,
}

impl ScoreMod {
    /// The score modification of (batch `b`, query head `h`) of a validated spec.
    pub fn of(spec: &AttentionSpec, b: usize, h: usize) -> ScoreMod {
        ScoreMod {
            scale: spec.scale_value(),
            softcap: spec.softcap,
            slope: spec.alibi_slope(b, h),
        }
    }

    /// The score of a raw dot product `q_i·k_j` for row `i`, key `j` of a sequence of `q_len`
    /// queries and `k_len` keys.
    #[inline]
    pub fn apply(&self, dot: f32, i: usize, j: usize, q_len: usize, k_len: usize) -> f32 {
        softcap(self.scale * dot, self.softcap) + alibi(self.slope, i, j, q_len, k_len)
    }
}

/// `c * tanh(x / c)`, or `x` when `c` is 0.
#[inline]
pub fn softcap(x: f32, c: f32) -> f32 {
    if c > 0.0 {
        c * (x / c).tanh()
    } else {
        x
    }
}

/// d softcap(x) / dx given the capped value `y = softcap(x)`: `1 - (y / c)^2` (1 when off).
#[inline]
pub fn softcap_grad(y: f32, c: f32) -> f32 {
    if c > 0.0 {
        let t = y / c;
        1.0 - t * t
    } else {
        1.0
    }
}

/// The ALiBi bias `-slope * |i + k_len - q_len - j|` (bottom-right aligned distance).
#[inline]
pub fn alibi(slope: f32, i: usize, j: usize, q_len: usize, k_len: usize) -> f32 {
    if slope == 0.0 {
        return 0.0;
    }
    let dist = (i as i128 + k_len as i128 - q_len as i128 - j as i128).unsigned_abs();
    -slope * dist as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softcap_bounds_and_derivative() {
        assert_eq!(softcap(3.0, 0.0), 3.0);
        assert!((softcap(100.0, 5.0) - 5.0).abs() < 1e-4);
        let (x, c, h) = (1.3f32, 2.0f32, 1e-3f32);
        let numeric = (softcap(x + h, c) - softcap(x - h, c)) / (2.0 * h);
        assert!((numeric - softcap_grad(softcap(x, c), c)).abs() < 1e-3);
        assert_eq!(softcap_grad(7.0, 0.0), 1.0);
    }

    #[test]
    fn alibi_is_bottom_right_aligned() {
        // 2 queries, 5 keys: row 1 sits on key 4.
        assert_eq!(alibi(0.5, 1, 4, 2, 5), 0.0);
        assert_eq!(alibi(0.5, 1, 2, 2, 5), -1.0);
        assert_eq!(alibi(0.5, 0, 4, 2, 5), -0.5);
    }
}
