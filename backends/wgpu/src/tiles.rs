//! Work tiles of the flash kernels (how many query rows and keys one workgroup handles, and how
//! a row is spread over invocations), chosen from the head dimensions and the adapter's limits.

/// The compile-time shape of one kernel variant. `block_m` query rows and `block_n` keys, as
/// in every backend: the forward and dQ kernels own `block_m` rows and stage `block_n` keys per
/// step; the dK/dV kernel owns `block_n` keys and stages `block_m` rows per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    /// Invocations per workgroup.
    pub wg: u32,
    /// Invocations that share one owned row (a power of two).
    pub tpr: u32,
    /// Query rows of a block.
    pub block_m: u32,
    /// Keys of a block.
    pub block_n: u32,
    /// q (or k) elements per invocation (even).
    pub ds: u32,
    /// Output (or v) elements per invocation (even).
    pub dvs: u32,
    /// Sum a row's partial dot products with subgroup shuffles (else workgroup memory).
    pub subgroups: bool,
}

/// How the partial dot products of a row's `tpr` invocations are summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// One invocation per row: nothing to sum.
    None,
    Subgroup,
    Workgroup,
}

/// The largest per-invocation slice: keeps q, O and the scores in registers.
const MAX_SLOTS: u32 = 32;
/// Workgroup storage the kernels may use: WebGPU's default, whatever the adapter offers.
pub const WEBGPU_WORKGROUP_STORAGE: u32 = 16 * 1024;
/// Invocations per workgroup at most.
const MAX_WG: u32 = 128;

/// The adapter's limits that shape tiles.
#[derive(Clone, Copy, Debug)]
pub struct TileLimits {
    pub max_invocations: u32,
    pub workgroup_storage: u32,
    /// Verified subgroup width (0: no subgroup path).
    pub subgroup_size: u32,
}

impl TileLimits {
    fn budget(&self) -> u32 {
        self.workgroup_storage.min(WEBGPU_WORKGROUP_STORAGE)
    }
}

impl Tiles {
    pub fn dp(&self) -> u32 {
        self.tpr * self.ds
    }
    pub fn dvp(&self) -> u32 {
        self.tpr * self.dvs
    }
    pub fn kvw(&self) -> u32 {
        self.dp().max(self.dvp())
    }

    pub fn reduction(&self) -> Reduction {
        match (self.tpr, self.subgroups) {
            (1, _) => Reduction::None,
            (_, true) => Reduction::Subgroup,
            (_, false) => Reduction::Workgroup,
        }
    }

    /// Floats of the workgroup reduction buffer for `rows` owned rows and `n` values per row.
    fn red(&self, rows: u32, n: u32) -> u32 {
        match self.reduction() {
            Reduction::Workgroup => rows * n * self.tpr,
            _ => 0,
        }
    }

    /// Bytes of workgroup memory the forward kernel declares (one K-or-V tile).
    pub fn forward_bytes(&self) -> u32 {
        4 * (self.block_n * self.kvw() + self.red(self.block_m, self.block_n))
    }

    /// Bytes of workgroup memory the dQ kernel declares (K and V tiles).
    pub fn dq_bytes(&self) -> u32 {
        4 * (self.block_n * (self.dp() + self.dvp()) + self.red(self.block_m, self.block_n))
    }

    /// Bytes of workgroup memory the dK/dV kernel declares (q, dout and statistics tiles).
    pub fn dkdv_bytes(&self) -> u32 {
        4 * (self.block_m * (self.dp() + self.dvp() + 2) + self.red(self.block_n, self.block_m))
    }

    /// A row of `d` / `dv` elements spread over invocations, `owned` rows per workgroup at most.
    fn spread(d: u32, dv: u32, lim: &TileLimits) -> Tiles {
        let mut tpr = 1;
        while tpr < 16 && slots(d.max(dv), tpr) > MAX_SLOTS {
            tpr *= 2;
        }
        let subgroups = lim.subgroup_size >= tpr && lim.subgroup_size > 0 && tpr > 1;
        Tiles {
            wg: lim.max_invocations.clamp(tpr, MAX_WG),
            tpr,
            block_m: 1,
            block_n: 32,
            ds: slots(d, tpr),
            dvs: slots(dv, tpr),
            subgroups,
        }
    }

    /// Forward tiles for head dims `d` / `dv` and the longest query sequence `max_q_len`.
    pub fn forward(d: u32, dv: u32, max_q_len: u32, lim: &TileLimits) -> Tiles {
        let mut t = Tiles::spread(d, dv, lim);
        let full_rows = (t.wg / t.tpr).max(1);
        // Short queries (decode): fewer rows, but keep at least 32 invocations for the tile loads.
        let min_rows = (32 / t.tpr).clamp(1, full_rows);
        t.block_m = max_q_len
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(full_rows)
            .clamp(min_rows, full_rows);
        t.wg = t.block_m * t.tpr;
        while t.block_n > 1 && t.forward_bytes() > lim.budget() {
            t.block_n /= 2;
        }
        t
    }

    /// dQ tiles: `block_m` owned query rows, K and V tiles of `block_n` keys.
    pub fn backward_dq(d: u32, dv: u32, max_q_len: u32, lim: &TileLimits) -> Tiles {
        let mut t = Tiles::forward(d, dv, max_q_len, lim);
        t.block_n = 32;
        while t.block_n > 1 && t.dq_bytes() > lim.budget() {
            t.block_n /= 2;
        }
        t
    }

    /// dK/dV tiles: `block_n` owned keys, q and dout tiles of `block_m` rows.
    pub fn backward_dkdv(d: u32, dv: u32, lim: &TileLimits) -> Tiles {
        let mut t = Tiles::spread(d, dv, lim);
        t.block_n = (t.wg / t.tpr).max(1);
        t.wg = t.block_n * t.tpr;
        t.block_m = 32;
        while t.block_m > 1 && t.dkdv_bytes() > lim.budget() {
            t.block_m /= 2;
        }
        t
    }
}

/// Forward tile sizes forced by `FLASHATTN_WGPU_TILES="block_m=32,block_n=16"` (`br` / `bc`
/// are accepted as the older names), for tuning on new hardware; values that do not fit the
/// adapter are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TileOverride {
    pub block_m: Option<u32>,
    pub block_n: Option<u32>,
}

impl TileOverride {
    pub fn from_env() -> Option<TileOverride> {
        let value = std::env::var("FLASHATTN_WGPU_TILES").ok()?;
        let parsed = TileOverride::parse(&value);
        if parsed.is_none() {
            log::warn!(
                "FLASHATTN_WGPU_TILES={value:?} ignored: expected block_m=N,block_n=N (powers of two)"
            );
        }
        parsed
    }

    fn parse(s: &str) -> Option<TileOverride> {
        let mut o = TileOverride::default();
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=')?;
            let v: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|v: &u32| v.is_power_of_two())?;
            match k.trim() {
                "block_m" | "br" => o.block_m = Some(v),
                "block_n" | "bc" => o.block_n = Some(v.min(64)),
                _ => return None,
            }
        }
        Some(o)
    }

    pub fn apply(&self, tiles: Tiles, lim: &TileLimits) -> Tiles {
        let mut t = tiles;
        if let Some(m) = self.block_m {
            t.block_m = m.clamp(1, (256 / t.tpr).max(1));
            t.wg = t.block_m * t.tpr;
        }
        if let Some(n) = self.block_n {
            t.block_n = n;
        }
        if t.forward_bytes() <= lim.budget() && t.wg <= lim.max_invocations {
            t
        } else {
            tiles
        }
    }
}

/// Even slot count per invocation for `dim` elements over `tpr` invocations.
fn slots(dim: u32, tpr: u32) -> u32 {
    2 * dim.div_ceil(2 * tpr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(sg: u32) -> TileLimits {
        TileLimits {
            max_invocations: 256,
            workgroup_storage: 16384,
            subgroup_size: sg,
        }
    }

    #[test]
    fn fits_webgpu_default_storage_for_every_head_dim() {
        for d in 1..=256 {
            for sg in [0, 32] {
                let l = lim(sg);
                let t = Tiles::forward(d, d, 4096, &l);
                assert!(t.forward_bytes() <= 16384, "d={d} {t:?}");
                assert!(t.block_n >= 4, "d={d} {t:?}");
                assert!(t.ds <= 32 && t.dp() >= d, "d={d} {t:?}");
                assert!(t.wg <= 256 && t.wg == t.block_m * t.tpr);
                let q = Tiles::backward_dq(d, d, 4096, &l);
                assert!(q.dq_bytes() <= 16384 && q.block_n >= 2, "dq d={d} {q:?}");
                let k = Tiles::backward_dkdv(d, d, &l);
                assert!(
                    k.dkdv_bytes() <= 16384 && k.block_m >= 2,
                    "dkdv d={d} {k:?}"
                );
                assert_eq!(k.wg, k.block_n * k.tpr);
            }
        }
    }

    #[test]
    fn decode_uses_small_row_blocks() {
        let t = Tiles::forward(128, 128, 1, &lim(0));
        assert_eq!(t.tpr, 4);
        assert_eq!(t.block_m, 8);
        let t = Tiles::forward(64, 64, 4096, &lim(0));
        assert_eq!((t.tpr, t.block_m, t.block_n), (2, 64, 16));
    }

    #[test]
    fn overrides_parse_both_names() {
        let o = TileOverride::parse("block_m=32,bc=16").unwrap();
        assert_eq!((o.block_m, o.block_n), (Some(32), Some(16)));
        assert!(TileOverride::parse("block_m=3").is_none());
        assert!(TileOverride::parse("x=4").is_none());
    }
}
