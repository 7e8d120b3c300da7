//! Decode on device tables: the cache lengths live only on the device (the host spec's
//! `kv_cache.seqlens` are upper bounds, [`decode_bounds`], like FlashAttention's
//! `max_seqlen_k`), ALiBi slopes and rotary cos / sin are the caller's [`DeviceTable`]s, and
//! the split-KV scratch is one caller allocation ([`DeviceWorkspace`]), so that
//! `CudaBackend::decode_device_with_tables` allocates and uploads nothing and returns without
//! waiting for its kernels. The spec still says which tables there are: its ALiBi entry (per
//! head or per batch and head) and its rotary entry (dim, style, and the tables' length), whose
//! values are not read when the device tables are given (zeros will do).
//!
//! Why a caller workspace and not one the backend keeps: a backend-held buffer reused by a call
//! that did not wait is only safe while every call runs on one stream and the buffer never
//! grows (freeing it under a queued kernel is undefined); the caller knows its streams, and
//! sizes the scratch once from its longest bound with `decode_workspace_bytes`.

use crate::tables::{check_needed, slopes_len, DeviceTable};
use flashattn_core::{AttentionSpec, Error, Result};

/// Host `kv_cache.seqlens` for `batch` entries whose real lengths, on the device, are at most
/// `max_seqlen_k` rows each (before this call's append). Any per-entry bounds work too: a
/// plan sized from them holds for every real length within them.
pub fn decode_bounds(batch: usize, max_seqlen_k: usize) -> Result<Vec<i32>> {
    let bound = i32::try_from(max_seqlen_k)
        .map_err(|_| Error::argument("max_seqlen_k", max_seqlen_k, "must fit int32"))?;
    Ok(vec![bound; batch])
}

/// A caller-owned device allocation of `bytes` bytes at `ptr` (16-byte aligned) for a decode
/// call's scratch: the rotated q and the split-KV partial outputs and LSEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceWorkspace {
    pub ptr: u64,
    pub bytes: usize,
}

/// What a decode call on device tables reads from the caller's device memory beside
/// `DeviceDecode`; `None` uploads the spec's host copy (and the call waits for its kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeDeviceTables {
    /// `[heads_q]` (or `[batch, heads_q]` when the spec's ALiBi is per batch) f32; only with
    /// ALiBi.
    pub alibi_slopes: Option<DeviceTable>,
    /// The whole `[seqlen_ro, rotary_dim / 2]` f32 tables, indexed by position; only with
    /// rotary.
    pub rotary_cos: Option<DeviceTable>,
    pub rotary_sin: Option<DeviceTable>,
    /// Scratch of at least `decode_workspace_bytes(spec)` bytes; `None`: the call allocates
    /// its own when it needs one (and waits).
    pub workspace: Option<DeviceWorkspace>,
}

impl DecodeDeviceTables {
    /// Every table `spec` needs, given (the workspace aside, which depends on the plan).
    pub fn complete(&self, spec: &AttentionSpec) -> bool {
        self.needed(spec)
            .iter()
            .all(|(_, table, len)| len.is_none() || table.is_some())
    }

    /// Refuses, by name, a table `spec` has no use for, a null or misaligned pointer, a length
    /// other than `spec`'s, or a workspace smaller than `needed_bytes` or not 16-byte aligned.
    pub fn check(&self, spec: &AttentionSpec, needed_bytes: usize) -> Result<()> {
        check_needed(&self.needed(spec), |name| match name {
            "alibi_slopes" => "given, but the spec has no ALiBi",
            _ => "given, but the spec's cache has no rotary",
        })?;
        let Some(w) = self.workspace else {
            return Ok(());
        };
        if w.ptr == 0 || w.ptr % 16 != 0 {
            return Err(Error::argument(
                "workspace",
                format!("{:#x}", w.ptr),
                "the workspace must be non-null and 16-byte aligned",
            ));
        }
        if w.bytes < needed_bytes {
            return Err(Error::argument(
                "workspace",
                format!("{} bytes", w.bytes),
                format!("the call needs {needed_bytes} bytes (decode_workspace_bytes)"),
            ));
        }
        Ok(())
    }

    /// (name, table, the length `spec` needs or `None` when it needs none).
    fn needed(
        &self,
        spec: &AttentionSpec,
    ) -> [(&'static str, Option<DeviceTable>, Option<usize>); 3] {
        let rotary = spec.kv_cache.as_ref().and_then(|c| c.rotary.as_ref());
        let rot = rotary.map(|r| r.cos.len());
        [
            ("alibi_slopes", self.alibi_slopes, slopes_len(spec)),
            ("rotary_cos", self.rotary_cos, rot),
            ("rotary_sin", self.rotary_sin, rot),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn_core::testing::decode::{contiguous, rotary, spec};

    fn table(ptr: u64, len: usize) -> Option<DeviceTable> {
        Some(DeviceTable { ptr, len })
    }

    fn workspace(ptr: u64, bytes: usize) -> Option<DeviceWorkspace> {
        Some(DeviceWorkspace { ptr, bytes })
    }

    /// 2 entries, 4 query heads, ALiBi per head, rotary dim 16 over 40 positions.
    fn full() -> AttentionSpec {
        let cache = contiguous(&[7, 20], 2, 5).rotary(rotary(16, 40, false));
        spec(4, 2, 1, 32, cache).alibi(vec![0.5; 4], false)
    }

    fn all() -> DecodeDeviceTables {
        DecodeDeviceTables {
            alibi_slopes: table(0x1000, 4),
            rotary_cos: table(0x2000, 40 * 8),
            rotary_sin: table(0x3004, 40 * 8),
            workspace: workspace(0x4000, 256),
        }
    }

    fn refused(r: Result<()>, name: &str, needle: &str) {
        let e = r.expect_err("refused").to_string();
        assert!(e.contains(name) && e.contains(needle), "{e}");
    }

    #[test]
    fn good_tables_pass_and_complete_says_when_nothing_is_uploaded() {
        let spec = full();
        all().check(&spec, 256).unwrap();
        assert!(all().complete(&spec));
        let no_cos = DecodeDeviceTables {
            rotary_cos: None,
            ..all()
        };
        no_cos.check(&spec, 0).unwrap();
        assert!(!no_cos.complete(&spec));
        // No ALiBi, no rotary: nothing needed; per-batch slopes: batch x heads.
        let plain = self::spec(4, 2, 1, 32, contiguous(&[3, 0], 0, 2));
        DecodeDeviceTables::default().check(&plain, 0).unwrap();
        assert!(DecodeDeviceTables::default().complete(&plain));
        let per_batch = plain.alibi(vec![0.5; 8], true);
        let slopes = DecodeDeviceTables {
            alibi_slopes: table(0x1000, 8),
            ..Default::default()
        };
        slopes.check(&per_batch, 0).unwrap();
    }

    #[test]
    fn bad_tables_are_refused_by_name() {
        let spec = full();
        let with = |f: fn(&mut DecodeDeviceTables)| {
            let mut t = all();
            f(&mut t);
            t.check(&spec, 256)
        };
        refused(
            with(|t| t.alibi_slopes = table(0, 4)),
            "alibi_slopes",
            "non-null",
        );
        refused(
            with(|t| t.rotary_cos = table(0x2002, 320)),
            "rotary_cos",
            "aligned",
        );
        refused(
            with(|t| t.rotary_sin = table(0x3000, 319)),
            "rotary_sin",
            "320 elements",
        );
        refused(
            with(|t| t.alibi_slopes = table(0x1000, 8)),
            "alibi_slopes",
            "4 elements",
        );
        refused(
            with(|t| t.workspace = workspace(0, 256)),
            "workspace",
            "non-null",
        );
        refused(
            with(|t| t.workspace = workspace(0x4008, 256)),
            "workspace",
            "aligned",
        );
        refused(
            with(|t| t.workspace = workspace(0x4000, 255)),
            "workspace",
            "256 bytes",
        );
        let plain = self::spec(4, 2, 1, 32, contiguous(&[3, 0], 0, 2));
        refused(all().check(&plain, 0), "alibi_slopes", "no ALiBi");
        let rot_only = DecodeDeviceTables {
            rotary_sin: table(0x3000, 320),
            ..Default::default()
        };
        refused(rot_only.check(&plain, 0), "rotary_sin", "no rotary");
    }

    #[test]
    fn decode_bounds_are_one_bound_per_entry_and_validate() {
        assert_eq!(decode_bounds(3, 300).unwrap(), vec![300; 3]);
        let e = decode_bounds(2, 1 << 31).unwrap_err().to_string();
        assert!(e.contains("max_seqlen_k") && e.contains("int32"), "{e}");
        // The bounds make a valid cache spec wherever the real lengths fit.
        let cache = contiguous(&decode_bounds(4, 300).unwrap(), 1, 0);
        spec(4, 2, 1, 32, cache).validate().unwrap();
    }
}
