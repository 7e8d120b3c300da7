//! Side tables on the device: `cu_seqlens_q` / `cu_seqlens_k` (int32) and ALiBi slopes (f32)
//! that a device-resident caller already holds in its own allocations. Given as
//! [`DeviceTables`], the kernels read them where they are: no upload, and a forward call whose
//! every table is the caller's allocates nothing, so it returns without waiting for its stream
//! (`CudaBackend::forward_device_with_tables`).
//!
//! The spec still describes the problem on the host: the kernels' grid is sized from its
//! varlen batch, token totals and longest sequence, and its ALiBi entry says which slopes
//! layout (per head or per batch and head) the device table has. [`varlen_bounds`] builds host
//! `cu_seqlens` from those bounds alone (FlashAttention's `max_seqlen_q` / `max_seqlen_k`).

use flashattn_core::{AttentionSpec, Error, Result};

/// A caller-owned device array of `len` 4-byte elements (int32 or f32) at `ptr` (a
/// `CUdeviceptr` of the backend's device's primary context).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTable {
    pub ptr: u64,
    pub len: usize,
}

/// The side tables of a forward or backward call that the caller holds on the device; `None`
/// uploads the spec's host copy (the behaviour of the calls without tables).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceTables {
    /// `[batch + 1]` int32 token offsets of q's sequences; only for a varlen spec.
    pub cu_seqlens_q: Option<DeviceTable>,
    /// `[batch + 1]` int32 token offsets of k's and v's sequences; only for a varlen spec.
    pub cu_seqlens_k: Option<DeviceTable>,
    /// `[heads_q]` (or `[batch, heads_q]` when the spec's ALiBi is per batch) f32 slopes;
    /// only with ALiBi.
    pub alibi_slopes: Option<DeviceTable>,
}

impl DeviceTables {
    /// Every table `spec` needs, given (a call with them uploads nothing).
    pub fn complete(&self, spec: &AttentionSpec) -> bool {
        self.needed(spec)
            .iter()
            .all(|(_, table, len)| len.is_none() || table.is_some())
    }

    /// Refuses, by name, a table `spec` has no use for, a null or misaligned pointer, or a
    /// length other than `spec`'s.
    pub fn check(&self, spec: &AttentionSpec) -> Result<()> {
        check_needed(&self.needed(spec), |name| match name {
            "alibi_slopes" => "given, but the spec has no ALiBi",
            _ => "given, but the spec is not varlen",
        })
    }

    /// (name, table, the length `spec` needs or `None` when it needs none).
    fn needed(
        &self,
        spec: &AttentionSpec,
    ) -> [(&'static str, Option<DeviceTable>, Option<usize>); 3] {
        let cu = spec.is_varlen().then_some(spec.batch + 1);
        [
            ("cu_seqlens_q", self.cu_seqlens_q, cu),
            ("cu_seqlens_k", self.cu_seqlens_k, cu),
            ("alibi_slopes", self.alibi_slopes, slopes_len(spec)),
        ]
    }
}

/// Elements of `spec`'s ALiBi slopes (`[heads_q]` or `[batch, heads_q]`), `None` without ALiBi.
pub(crate) fn slopes_len(spec: &AttentionSpec) -> Option<usize> {
    let per_batch = spec.alibi.as_ref()?.per_batch;
    Some(if per_batch {
        spec.batch * spec.heads_q
    } else {
        spec.heads_q
    })
}

/// Refuses, by name, a table of `needed` (name, table, the length the spec needs or `None`)
/// the spec has no use for (`no_use` says why), a null or misaligned pointer, or another
/// length.
pub(crate) fn check_needed(
    needed: &[(&'static str, Option<DeviceTable>, Option<usize>)],
    no_use: fn(&str) -> &'static str,
) -> Result<()> {
    for &(name, table, len) in needed {
        let Some(t) = table else {
            continue;
        };
        let Some(len) = len else {
            return Err(Error::argument(name, format!("{t:?}"), no_use(name)));
        };
        if t.ptr == 0 || t.ptr % 4 != 0 {
            return Err(Error::argument(
                name,
                format!("{:#x}", t.ptr),
                "device tables must be non-null and 4-byte aligned",
            ));
        }
        if t.len != len {
            return Err(Error::argument(
                name,
                t.len,
                format!("the spec needs {len} elements"),
            ));
        }
    }
    Ok(())
}

/// Host `cu_seqlens_q` and `cu_seqlens_k` for a spec whose device tables hold the real
/// offsets: `batch` sequences, `total_q` / `total_k` tokens, none longer than `max_q` /
/// `max_k`. They size the launch exactly as the real offsets would (the kernels read the
/// device tables); `Err` names a bound that no offsets can meet.
pub fn varlen_bounds(
    batch: usize,
    (total_q, total_k): (usize, usize),
    (max_q, max_k): (usize, usize),
) -> Result<(Vec<i32>, Vec<i32>)> {
    let offsets = |name: &'static str, total: usize, max: usize| {
        if batch == 0 || total > batch.saturating_mul(max) {
            return Err(Error::argument(
                name,
                max,
                format!("{batch} sequences of at most {max} tokens cannot hold {total}"),
            ));
        }
        // Full sequences first: the longest is min(max, total), as in the real offsets.
        (0..=batch)
            .map(|b| {
                let end = (b * max).min(total);
                i32::try_from(end)
                    .map_err(|_| Error::argument(name, total, "token offsets must fit int32"))
            })
            .collect::<Result<Vec<i32>>>()
    };
    Ok((
        offsets("max_seqlen_q", total_q, max_q)?,
        offsets("max_seqlen_k", total_k, max_k)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ptr: u64, len: usize) -> Option<DeviceTable> {
        Some(DeviceTable { ptr, len })
    }

    fn varlen() -> AttentionSpec {
        AttentionSpec::new(3, 4, 40, 40, 64).varlen(vec![0, 7, 7, 40], vec![0, 10, 20, 40])
    }

    fn error_names(r: Result<()>, name: &str, needle: &str) {
        let e = r.expect_err("refused").to_string();
        assert!(e.contains(name) && e.contains(needle), "{e}");
    }

    #[test]
    fn good_tables_pass_and_complete_says_when_nothing_is_uploaded() {
        let spec = varlen().alibi(vec![0.5; 4], false);
        let all = DeviceTables {
            cu_seqlens_q: table(0x1000, 4),
            cu_seqlens_k: table(0x2004, 4),
            alibi_slopes: table(0x3000, 4),
        };
        all.check(&spec).unwrap();
        assert!(all.complete(&spec));
        let some = DeviceTables {
            alibi_slopes: None,
            ..all
        };
        some.check(&spec).unwrap();
        assert!(!some.complete(&spec));
        // A dense spec without ALiBi needs none: no tables is complete.
        let dense = AttentionSpec::new(2, 4, 17, 17, 64);
        DeviceTables::default().check(&dense).unwrap();
        assert!(DeviceTables::default().complete(&dense));
        // Per-batch slopes: batch x heads.
        let per_batch = varlen().alibi(vec![0.5; 12], true);
        let slopes = DeviceTables {
            alibi_slopes: table(0x3000, 12),
            ..Default::default()
        };
        slopes.check(&per_batch).unwrap();
    }

    #[test]
    fn bad_tables_are_refused_by_name() {
        let spec = varlen().alibi(vec![0.5; 4], false);
        let t = |cu_q, cu_k, slopes| DeviceTables {
            cu_seqlens_q: cu_q,
            cu_seqlens_k: cu_k,
            alibi_slopes: slopes,
        };
        error_names(
            t(table(0, 4), None, None).check(&spec),
            "cu_seqlens_q",
            "non-null",
        );
        error_names(
            t(None, table(0x1002, 4), None).check(&spec),
            "cu_seqlens_k",
            "aligned",
        );
        error_names(
            t(table(0x1000, 3), None, None).check(&spec),
            "cu_seqlens_q",
            "4 elements",
        );
        error_names(
            t(None, None, table(0x1000, 12)).check(&spec),
            "alibi_slopes",
            "4 elements",
        );
        let dense = AttentionSpec::new(2, 4, 17, 17, 64);
        error_names(
            t(table(0x1000, 3), None, None).check(&dense),
            "cu_seqlens_q",
            "not varlen",
        );
        error_names(
            t(None, None, table(0x1000, 4)).check(&dense),
            "alibi_slopes",
            "no ALiBi",
        );
    }

    #[test]
    fn varlen_bounds_size_the_launch_like_the_real_offsets() {
        let (q, k) = varlen_bounds(3, (40, 33), (33, 17)).unwrap();
        assert_eq!(
            (q.as_slice(), k.as_slice()),
            (&[0, 33, 40, 40][..], &[0, 17, 33, 33][..])
        );
        let spec = AttentionSpec::new(3, 4, 40, 33, 64).varlen(q, k);
        let checked = spec.validate().unwrap();
        assert_eq!((checked.sizes.max_q_len, checked.sizes.max_k_len), (33, 17));
        assert_eq!((checked.sizes.q_tokens, checked.sizes.k_tokens), (40, 33));
        // A single sequence; then bounds nothing meets.
        assert_eq!(varlen_bounds(1, (1, 1), (1, 1)).unwrap().0, vec![0, 1]);
        let e = varlen_bounds(2, (40, 10), (19, 10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_seqlen_q") && e.contains("40"), "{e}");
        let e = varlen_bounds(0, (0, 0), (1, 1)).unwrap_err().to_string();
        assert!(e.contains("0 sequences"), "{e}");
    }
}
