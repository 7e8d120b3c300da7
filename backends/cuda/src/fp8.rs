//! FP8 e4m3 on Hopper: the side tables of one call (descales, the transposed V's layout) and
//! the pass that transposes V (kernels/fp8_vt.cu) before the attention kernel runs.
//!
//! wgmma reads 8-bit B operands K-major only, so O += P V needs V as `[heads_kv, head_dim,
//! keys]`. The transpose runs once per call into a scratch buffer as large as V (plus padding);
//! the attention kernel then loads it with TMA exactly like K. Each sequence's keys start at a
//! multiple of [`KEY_PAD`] and are zero-filled up to it, so a key block never reads another
//! sequence's values (a NaN there would otherwise reach rows that do not see it, as 0 x NaN).

use crate::device::{DevBuf, DeviceInfo};
use crate::tiles::{grid_x, grid_yz, num_blocks, HopperTiles, Launch, HOPPER_SMEM_LIMIT};
use crate::variants::Variant;
use flashattn_core::{CheckedSpec, Result};

/// Head dimensions of the FP8 e4m3 Hopper kernel: rows of 128 or 256 bytes, whole 128-byte
/// swizzle spans (head_dim 64, 64-byte rows, is not built yet). Score mods (softcap, ALiBi)
/// at 128 only: the 256 build with them spills registers ([`fp8_score_mod_builds`]).
pub const FP8_HEAD_DIMS: [usize; 2] = [128, 256];

/// Whether the FP8 kernel is built with score mods for `head_dim` (not at 256: O, S, P and the
/// mods' state spill past 240 registers in every schedule tried, 12-23 bytes).
pub fn fp8_score_mod_builds(head_dim: usize) -> bool {
    head_dim != 256
}

/// Keys per block of the FP8 kernel: whole 128-key Vt boxes (kernels/fp8_vt.cu). Each divides
/// `fp8::KEY_PAD`, so a block never reads past its sequence's zero-padded Vt columns.
pub const FP8_BLOCK_N_CHOICES: [usize; 2] = [128, 256];

/// The FP8 e4m3 tiles for `head_dim` (compile-checked only; not yet measured on a GPU):
/// - 128: 128 x 128, 2 stages: O (64 regs) + S (64) + P (16); 80 KiB of shared memory.
/// - 256: 128 x 128, 2 stages (FA3's FP8 choice): O (128) + S (64) + P (16); Q 32 KiB +
///   2 stages x (K + Vt) 64 KiB = 160 KiB.
pub fn hopper_fp8_tiles(head_dim: usize) -> Option<HopperTiles> {
    FP8_HEAD_DIMS.contains(&head_dim).then_some(HopperTiles {
        block_m: 128,
        block_n: 128,
        stages: 2,
    })
}

/// `tiles::check_tiles` for the FP8 kernel: keys per block from [`FP8_BLOCK_N_CHOICES`].
pub fn check_fp8_tiles(
    head_dim: usize,
    block_n: Option<usize>,
    stages: Option<usize>,
) -> Result<HopperTiles, String> {
    let t = hopper_fp8_tiles(head_dim).ok_or_else(|| {
        format!("no FP8 Hopper kernel for head_dim {head_dim} (built for {FP8_HEAD_DIMS:?})")
    })?;
    t.with_overrides(&FP8_BLOCK_N_CHOICES, block_n, stages, head_dim, 1)
}

/// Vt columns of each sequence are a multiple of this (every FP8 `block_n` divides it).
pub const KEY_PAD: usize = 256;
const _: () = assert!(
    KEY_PAD.is_multiple_of(FP8_BLOCK_N_CHOICES[0])
        && KEY_PAD.is_multiple_of(FP8_BLOCK_N_CHOICES[1])
);

/// Keys per block of the transpose pass (one group of P's register order).
const VT_KEYS: usize = 32;
/// Threads per block of the transpose pass (`VT_THREADS` in fp8_vt.cu).
const VT_THREADS: u32 = 256;

/// The FP8 kernels' second argument; `struct Fp8Args` in kernels/fp8_vt.cu (five pointers).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Fp8Args {
    pub descale_q: u64,
    pub descale_k: u64,
    pub descale_v: u64,
    pub vt_start: u64,
    pub vt: u64,
}

/// The FP8 e4m3 build of the Hopper kernel for `spec` (`select_hopper` has checked the arch),
/// or why not.
pub(crate) fn select(
    spec: &CheckedSpec<'_>,
    info: &DeviceInfo,
    block_n: Option<usize>,
    stages: Option<usize>,
) -> std::result::Result<Variant, String> {
    if spec.head_dim != spec.head_dim_v || !FP8_HEAD_DIMS.contains(&spec.head_dim) {
        return Err(format!(
            "the FP8 Hopper kernel takes head_dim = head_dim_v in {FP8_HEAD_DIMS:?}, not {}/{}",
            spec.head_dim, spec.head_dim_v
        ));
    }
    if spec.kv_cache.is_some() {
        return Err("the FP8 Hopper kernel does not read KV caches".to_string());
    }
    let tiles = check_fp8_tiles(spec.head_dim, block_n, stages)?;
    let smem = tiles.smem_bytes_with(spec.head_dim, 1);
    if smem > info.smem_optin.min(HOPPER_SMEM_LIMIT) {
        return Err(format!(
            "the FP8 Hopper kernel needs {smem} bytes of shared memory"
        ));
    }
    let score_mod = spec.softcap > 0.0 || spec.alibi.is_some();
    if score_mod && !fp8_score_mod_builds(spec.head_dim) {
        return Err(format!(
            "the FP8 Hopper kernel takes softcap and ALiBi at head_dim 128 only, not {} \
             (its head_dim 256 build with them would spill registers)",
            spec.head_dim
        ));
    }
    Ok(Variant::hopper(spec.dtype, spec.head_dim, score_mod, tiles))
}

/// What the host computes for one call: descales and where each sequence's Vt columns start.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Tables {
    /// q, k, v descales, each `[batch, heads_kv]` (1 where the spec gives none).
    pub descales: [Vec<f32>; 3],
    /// `[batch + 1]`: the first Vt column of each sequence; the last is the row length.
    pub vt_start: Vec<i32>,
}

impl Fp8Tables {
    /// The tables of a checked FP8 spec.
    pub fn new(spec: &CheckedSpec<'_>) -> Result<Fp8Tables> {
        let n = spec.batch * spec.heads_kv;
        let descales = match &spec.fp8_descale {
            Some(d) => [d.q.clone(), d.k.clone(), d.v.clone()],
            None => [vec![1.0; n], vec![1.0; n], vec![1.0; n]],
        };
        let mut vt_start = Vec::with_capacity(spec.batch + 1);
        let mut col = 0usize;
        vt_start.push(0);
        for b in 0..spec.batch {
            col += spec.seq(b).k_len.div_ceil(KEY_PAD) * KEY_PAD;
            vt_start.push(col);
        }
        // Vt's columns times heads and head_dim are indexed in 64 bits by the kernel, its
        // columns in 32; the TMA map takes sizes up to 2^32.
        let vt_start = vt_start
            .into_iter()
            .map(|c| crate::params::to_i32("FP8 Vt columns", c))
            .collect::<Result<Vec<i32>>>()?;
        Ok(Fp8Tables { descales, vt_start })
    }

    /// Columns of one Vt row (all sequences, padded); at least one pad, since a tensor map
    /// cannot be empty (with no keys at all nothing reads or writes Vt).
    pub fn vt_keys(&self) -> usize {
        (*self.vt_start.last().unwrap_or(&0) as usize).max(KEY_PAD)
    }

    /// The transpose pass: one block per (32-key group of the longest padded sequence, KV
    /// head, sequence), 32 keys of `head_dim` bytes in shared memory (a word more per key, as
    /// `VT_ROW` in fp8_vt.cu); `None` when there are no keys.
    pub fn transpose_launch(
        &self,
        heads_kv: usize,
        head_dim: usize,
    ) -> Result<Option<Launch>, String> {
        let longest = self
            .vt_start
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        if longest == 0 {
            return Ok(None);
        }
        let batch = self.vt_start.len() - 1;
        Ok(Some(Launch {
            grid: (
                grid_x(num_blocks(longest, VT_KEYS), "Vt key groups")?,
                grid_yz(heads_kv, "KV heads")?,
                grid_yz(batch, "sequences")?,
            ),
            block: VT_THREADS,
            smem: VT_KEYS * (head_dim / 4 + 1) * 4,
        }))
    }
}

/// Device copies of the tables and the Vt scratch buffer of one call.
pub(crate) struct Fp8Buffers {
    pub(crate) tables: Fp8Tables,
    descales: DevBuf,
    vt_start: DevBuf,
    pub(crate) vt: DevBuf,
}

impl Fp8Buffers {
    pub(crate) fn new(spec: &CheckedSpec<'_>) -> Result<Fp8Buffers> {
        let tables = Fp8Tables::new(spec)?;
        let all: Vec<f32> = tables.descales.concat();
        let vt_bytes = tables.vt_keys() * spec.heads_kv * spec.head_dim_v;
        Ok(Fp8Buffers {
            descales: DevBuf::from_bytes(bytemuck::cast_slice(&all))?,
            vt_start: DevBuf::from_bytes(bytemuck::cast_slice(&tables.vt_start))?,
            vt: DevBuf::alloc(vt_bytes)?,
            tables,
        })
    }

    pub(crate) fn bytes(&self) -> usize {
        self.descales.bytes + self.vt_start.bytes + self.vt.bytes
    }

    pub(crate) fn args(&self) -> Fp8Args {
        let n = self.tables.descales[0].len() as u64 * 4;
        Fp8Args {
            descale_q: self.descales.ptr,
            descale_k: self.descales.ptr + n,
            descale_v: self.descales.ptr + 2 * n,
            vt_start: self.vt_start.ptr,
            vt: self.vt.ptr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn_core::{AttentionSpec, DType, Fp8Descale};

    fn fp8(spec: AttentionSpec) -> AttentionSpec {
        spec.dtype(DType::Fp8E4m3)
    }

    #[test]
    fn each_sequence_starts_at_a_padded_column() {
        let spec = fp8(AttentionSpec::new(3, 4, 100, 300, 128).heads_kv(2));
        let t = Fp8Tables::new(&spec.validate().unwrap()).unwrap();
        assert_eq!(t.vt_start, [0, 512, 1024, 1536]);
        assert_eq!(t.vt_keys(), 1536);
        assert_eq!(grid(&t), (16, 2, 3));
        assert_eq!(t.descales, [vec![1.0; 6], vec![1.0; 6], vec![1.0; 6]]);
        // Varlen: an empty sequence takes no columns; 1 key takes a whole pad.
        let spec = fp8(AttentionSpec::new(1, 2, 10, 300, 256))
            .varlen(vec![0, 5, 5, 10], vec![0, 1, 1, 258]);
        let t = Fp8Tables::new(&spec.validate().unwrap()).unwrap();
        assert_eq!(t.vt_start, [0, 256, 256, 768]);
        assert_eq!(grid(&t), (16, 2, 3));
        let spec = fp8(AttentionSpec::new(1, 2, 5, 5, 256)).varlen(vec![0, 5], vec![0, 0]);
        let t = Fp8Tables::new(&spec.validate().unwrap()).unwrap();
        assert_eq!(t.transpose_launch(2, 256), Ok(None));
    }

    fn grid(t: &Fp8Tables) -> (u32, u32, u32) {
        let l = t.transpose_launch(2, 128).unwrap().unwrap();
        assert_eq!((l.block, l.smem), (VT_THREADS, 32 * 33 * 4));
        l.grid
    }

    #[test]
    fn descales_are_the_specs() {
        let d = Fp8Descale {
            q: vec![0.5, 2.0],
            k: vec![0.25, 1.0],
            v: vec![4.0, 8.0],
        };
        let spec = fp8(AttentionSpec::new(2, 2, 8, 8, 128).heads_kv(1)).fp8_descale(d.clone());
        let t = Fp8Tables::new(&spec.validate().unwrap()).unwrap();
        assert_eq!(t.descales, [d.q, d.k, d.v]);
    }

    fn gpu(major: i32, minor: i32) -> DeviceInfo {
        DeviceInfo {
            name: "test".into(),
            compute_capability: (major, minor),
            driver_version: 13000,
            sm_count: 132,
            smem_optin: crate::tiles::smem_optin_of_arch(&crate::arch_for(major, minor)),
            total_mem: 80 << 30,
        }
    }

    /// The variant `select_hopper` picks for `spec` on `info`, or its reason.
    fn pick(spec: &AttentionSpec, info: &DeviceInfo, n: Option<usize>, s: Option<usize>) -> String {
        let c = spec.validate().unwrap();
        match crate::select_hopper(&c, info, n, s) {
            Ok(v) => {
                assert!(v.builds_for("sm_90a"));
                assert_eq!(v.kind, crate::KernelKind::HopperFp8);
                v.name()
            }
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn fp8_runs_the_fp8_hopper_build_where_it_can() {
        let h100 = gpu(9, 0);
        let d = |hd| {
            fp8(AttentionSpec::new(2, 8, 300, 500, hd)
                .heads_kv(2)
                .causal(true))
        };
        assert_eq!(pick(&d(128), &h100, None, None), "hopper_fp8_fp8e4m3_d128");
        assert_eq!(pick(&d(256), &h100, None, None), "hopper_fp8_fp8e4m3_d256");
        assert_eq!(
            pick(&d(128).softcap(30.0), &h100, None, None),
            "hopper_fp8_fp8e4m3_d128_mod"
        );
        assert_eq!(
            pick(&d(128), &h100, Some(256), Some(3)),
            "hopper_fp8_fp8e4m3_d128_n256_s3"
        );
        let why = |spec: &AttentionSpec, info, n, s| {
            let e = pick(spec, info, n, s);
            assert!(e.starts_with("error: "), "{e}");
            e
        };
        // Only sm_90a; head_dim 128 or 256 with head_dim_v equal; whole Vt boxes; shared memory.
        let a100 = gpu(8, 0);
        assert!(why(&d(128), &a100, None, None).contains("sm_90a"));
        assert!(why(&d(64), &h100, None, None).contains("[128, 256]"));
        assert!(why(&d(128).head_dim_v(256), &h100, None, None).contains("128/256"));
        assert!(why(&d(128), &h100, Some(176), None).contains("176"));
        assert!(why(&d(256), &h100, Some(256), None).contains("shared memory"));
        assert!(why(&d(256), &h100, None, Some(5)).contains("stages 5"));
        let alibi = d(256).alibi(vec![0.1; 8], false);
        assert!(why(&alibi, &h100, None, None).contains("head_dim 128 only"));
    }

    #[test]
    fn fp8_tiles_fit() {
        // FP8: one-byte elements; whole 128-key Vt boxes; a 32-byte k-step of Q K^T and P V.
        for d in FP8_HEAD_DIMS {
            let t = hopper_fp8_tiles(d).unwrap();
            assert!(t.smem_bytes_with(d, 1) <= HOPPER_SMEM_LIMIT);
            assert_eq!((t.block_m, t.block_n % 128, d % 128), (128, 0, 0));
        }
        let t = hopper_fp8_tiles(256).unwrap();
        assert_eq!(t.smem_bytes_with(256, 1), 32768 + 131072 + 1024 + 80);
        let l = t.launch(256, 1, 1000, 132).unwrap();
        assert_eq!(l.smem, t.smem_bytes_with(256, 1));
        assert_eq!(hopper_fp8_tiles(64), None);
    }

    #[test]
    fn args_are_five_pointers() {
        assert_eq!(std::mem::size_of::<Fp8Args>(), 40);
    }
}
