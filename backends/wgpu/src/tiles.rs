//! Tile sizes of the flash kernel, chosen from the head dimensions and the adapter's limits.

/// The compile-time shape of one flash kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    /// Invocations that share one query row (a power of two).
    pub tpr: u32,
    /// Query rows per workgroup.
    pub br: u32,
    /// Keys per K/V tile.
    pub bc: u32,
    /// q elements per invocation (even).
    pub ds: u32,
    /// Output elements per invocation (even).
    pub dvs: u32,
    /// Reduce the row's partial dot products with subgroup shuffles (else workgroup memory).
    pub subgroups: bool,
}

/// The largest per-invocation slice: keeps q, O and the scores in registers.
const MAX_SLOTS: u32 = 32;
/// Workgroup storage the kernel may use: WebGPU's default, whatever the adapter offers.
pub const WEBGPU_WORKGROUP_STORAGE: u32 = 16 * 1024;

impl Tiles {
    pub fn wg(&self) -> u32 {
        self.br * self.tpr
    }
    pub fn dp(&self) -> u32 {
        self.tpr * self.ds
    }
    pub fn dvp(&self) -> u32 {
        self.tpr * self.dvs
    }
    pub fn kvw(&self) -> u32 {
        self.dp().max(self.dvp())
    }

    /// Bytes of workgroup memory the variant declares.
    pub fn workgroup_bytes(&self) -> u32 {
        let red = if self.subgroups {
            0
        } else {
            self.br * self.bc * self.tpr
        };
        4 * (self.bc * self.kvw() + red)
    }

    /// Chooses tiles for head dims `d`/`dv` and the longest query sequence `max_q_len`.
    /// `subgroup_size` is the verified subgroup width (0: no subgroup path).
    pub fn choose(
        d: u32,
        dv: u32,
        max_q_len: u32,
        max_invocations: u32,
        workgroup_storage: u32,
        subgroup_size: u32,
    ) -> Tiles {
        let dmax = d.max(dv);
        let mut tpr = 1;
        while tpr < 16 && slots(dmax, tpr) > MAX_SLOTS {
            tpr *= 2;
        }
        let subgroups = subgroup_size >= tpr && subgroup_size > 0 && tpr > 1;
        let wg = max_invocations.clamp(tpr, 128);
        let full_rows = (wg / tpr).max(1);
        // Short queries (decode): fewer rows, but keep at least 32 invocations for the tile loads.
        let min_rows = (32 / tpr).clamp(1, full_rows);
        let br = max_q_len
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(full_rows)
            .clamp(min_rows, full_rows);
        let budget = workgroup_storage.min(WEBGPU_WORKGROUP_STORAGE);
        let mut tiles = Tiles {
            tpr,
            br,
            bc: 32,
            ds: slots(d, tpr),
            dvs: slots(dv, tpr),
            subgroups,
        };
        while tiles.bc > 1 && tiles.workgroup_bytes() > budget {
            tiles.bc /= 2;
        }
        tiles
    }
}

/// Tile sizes forced by `FLASHATTN_WGPU_TILES="br=32,bc=16"` (for tuning on new hardware);
/// values that do not fit the adapter are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TileOverride {
    pub br: Option<u32>,
    pub bc: Option<u32>,
}

impl TileOverride {
    pub fn from_env() -> Option<TileOverride> {
        let s = std::env::var("FLASHATTN_WGPU_TILES").ok()?;
        let mut o = TileOverride::default();
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=')?;
            let v: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|v: &u32| v.is_power_of_two())?;
            match k.trim() {
                "br" => o.br = Some(v),
                "bc" => o.bc = Some(v.min(64)),
                _ => return None,
            }
        }
        Some(o)
    }

    pub fn apply(&self, tiles: Tiles, workgroup_storage: u32) -> Tiles {
        let mut t = tiles;
        if let Some(br) = self.br {
            t.br = br.clamp(1, (256 / t.tpr).max(1));
        }
        if let Some(bc) = self.bc {
            t.bc = bc;
        }
        if t.workgroup_bytes() <= workgroup_storage.min(WEBGPU_WORKGROUP_STORAGE) {
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

    #[test]
    fn fits_webgpu_default_storage_for_every_head_dim() {
        for d in 1..=256 {
            for sg in [0, 32] {
                let t = Tiles::choose(d, d, 4096, 256, 16384, sg);
                assert!(t.workgroup_bytes() <= 16384, "d={d} {t:?}");
                assert!(t.bc >= 4, "d={d} {t:?}");
                assert!(t.ds <= 32 && t.dp() >= d, "d={d} {t:?}");
                assert!(t.wg() <= 256);
            }
        }
    }

    #[test]
    fn decode_uses_small_row_blocks() {
        let t = Tiles::choose(128, 128, 1, 256, 16384, 0);
        assert_eq!(t.tpr, 4);
        assert_eq!(t.br, 8);
        let t = Tiles::choose(64, 64, 4096, 256, 16384, 0);
        assert_eq!((t.tpr, t.br, t.bc), (2, 64, 16));
    }
}
