//! On an NVIDIA GPU: `decode_device_with_tables`, the cache lengths on the device only. The
//! host spec knows a bound of them (`decode_bounds`) and holds zero ALiBi slopes and zero
//! rotary tables; the real lengths, slopes and rotary tables are the caller's device tables,
//! the split-KV scratch the caller's workspace (`decode_workspace_bytes`). The call queues on a
//! caller's non-blocking stream without waiting; the test synchronises the stream itself, then
//! core's `check_decode` compares out, LSE and both caches with the f64 reference of the real
//! problem: real lengths 0, 1, 17, 129 under 300, and 20000, 33 under 40000 (many splits).
//! NaN in q, a cached K row and a new V row reaches exactly the rows that see it. Bad tables
//! are refused by name. Without a GPU the tests print why they skip, unless
//! FLASHATTN_REQUIRE_BACKENDS names cuda.

mod common;

use common::decode_tables::{
    check_nans, host_of, long_cases, FromBounds, RunFromBounds, BOUND, LONG_BOUND, REAL,
};
use common::device::DeviceMem;
use cudarc::driver::result as drv;
use cudarc::driver::sys::CUstream;
use flashattn_core::testing::decode::{paged, rotary, spec, DecodeData};
use flashattn_core::testing::{backend_or_skip, check_decode};
use flashattn_core::{
    AttentionSpec, Backend, CacheLayout, DType, DecodeInputs, Error, Output, Result, Tensor,
};
use flashattn_cuda::{CudaBackend, DecodeDeviceTables, DeviceDecode, DeviceTable, DeviceWorkspace};

/// The backend on device 0 with a caller's non-blocking stream (held as an integer, so that
/// the runner is `Send + Sync`), destroyed on drop.
struct OnDevice {
    b: CudaBackend,
    stream: usize,
}

impl OnDevice {
    fn stream(&self) -> CUstream {
        self.stream as CUstream
    }
}

impl Drop for OnDevice {
    fn drop(&mut self) {
        // SAFETY: every call synchronised the stream before returning.
        unsafe { self.b.set_stream(std::ptr::null_mut()) };
        let _ = unsafe { drv::stream::destroy(self.stream()) };
    }
}

/// The backend planned from `bound`, or `None` after printing why (no GPU).
fn on_device(bound: usize) -> Option<FromBounds<OnDevice>> {
    let mut b = backend_or_skip("cuda", CudaBackend::new)?;
    let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).unwrap();
    // SAFETY: a live stream of device 0's primary context, destroyed after the last call.
    unsafe { b.set_stream(stream) };
    let runner = OnDevice {
        b,
        stream: stream as usize,
    };
    Some(FromBounds { runner, bound })
}

/// One call's device buffers: the real spec's tensors and tables, and a workspace of the
/// host spec's `decode_workspace_bytes` (`bytes`; none when 0).
struct Call {
    t: DeviceDecode,
    tables: DecodeDeviceTables,
    bytes: usize,
}

/// Bytes of `real`'s out and LSE.
fn output_bytes(real: &AttentionSpec) -> Result<(usize, usize)> {
    let c = real.validate()?;
    Ok((
        c.sizes.out * real.dtype.output().size_bytes(),
        c.sizes.lse * 4,
    ))
}

fn upload(
    b: &CudaBackend,
    mem: &DeviceMem,
    (real, host): (&AttentionSpec, &AttentionSpec),
    inputs: &DecodeInputs<'_>,
) -> Result<Call> {
    let cache = real.kv_cache.as_ref().expect("a decode spec");
    let ints = |v: &[i32]| mem.upload(bytemuck::cast_slice(v));
    let floats = |v: &[f32]| DeviceTable {
        ptr: mem.upload(bytemuck::cast_slice(v)),
        len: v.len(),
    };
    let (out_bytes, lse_bytes) = output_bytes(real)?;
    let t = DeviceDecode {
        q: mem.upload(inputs.q.as_bytes()),
        k_cache: mem.upload(inputs.k_cache.as_ref().as_bytes()),
        v_cache: mem.upload(inputs.v_cache.as_ref().as_bytes()),
        k_new: inputs.k_new.as_ref().map(|k| mem.upload(k.as_bytes())),
        v_new: inputs.v_new.as_ref().map(|v| mem.upload(v.as_bytes())),
        out: mem.upload(&vec![0u8; out_bytes]),
        lse: real.return_lse.then(|| mem.upload(&vec![0u8; lse_bytes])),
        seqlens: ints(&cache.seqlens),
        block_table: match &cache.layout {
            CacheLayout::Paged { block_table, .. } => Some(ints(block_table)),
            CacheLayout::Contiguous { .. } => None,
        },
        batch_idx: cache.batch_idx.as_deref().map(ints),
    };
    let rot = cache.rotary.as_ref();
    let bytes = b.decode_workspace_bytes(host)?;
    let tables = DecodeDeviceTables {
        alibi_slopes: real.alibi.as_ref().map(|a| floats(&a.slopes)),
        rotary_cos: rot.map(|r| floats(&r.cos)),
        rotary_sin: rot.map(|r| floats(&r.sin)),
        workspace: (bytes > 0).then(|| DeviceWorkspace {
            ptr: mem.upload(&vec![0u8; bytes]),
            bytes,
        }),
    };
    Ok(Call { t, tables, bytes })
}

/// Out, LSE and both caches (into `inputs`) of a finished call.
fn download(
    mem: &DeviceMem,
    call: &Call,
    real: &AttentionSpec,
    inputs: &mut DecodeInputs<'_>,
) -> Result<Output> {
    let dtype = real.dtype;
    let (out_bytes, lse_bytes) = output_bytes(real)?;
    let out = Tensor::from_bytes(dtype.output(), &mem.download(call.t.out, out_bytes))?;
    let lse = call
        .t
        .lse
        .map(|p| bytemuck::pod_collect_to_vec(&mem.download(p, lse_bytes)));
    for (cache, p) in [
        (&mut inputs.k_cache, call.t.k_cache),
        (&mut inputs.v_cache, call.t.v_cache),
    ] {
        let bytes = mem.download(p, cache.len() * dtype.size_bytes());
        // Exact: the values are of the cache's dtype.
        cache.write_f32(0, &Tensor::from_bytes(dtype, &bytes)?.to_f32_vec());
    }
    Ok(Output { out, lse })
}

impl RunFromBounds for OnDevice {
    fn device(&self) -> String {
        self.b.device()
    }

    /// Uploads, queues the call, synchronises the stream, downloads.
    fn run(
        &self,
        real: &AttentionSpec,
        host: &AttentionSpec,
        mut inputs: DecodeInputs<'_>,
    ) -> Result<Output> {
        let mem = DeviceMem::new();
        let call = upload(&self.b, &mem, (real, host), &inputs)?;
        // SAFETY: every pointer holds its tensor's or table's bytes; `mem` outlives the
        // synchronisation below.
        unsafe {
            self.b
                .decode_device_with_tables(host, &call.t, &call.tables)
        }?;
        unsafe { drv::stream::synchronize(self.stream()) }
            .map_err(|e| Error::backend("cuda", format!("{e:?}")))?;
        download(&mem, &call, real, &mut inputs)
    }
}

/// The real problem: paged (page 16) with room for the bound, 1 new row, rotary on 32 of 128,
/// ALiBi per head, GQA 8/2.
fn problem(dtype: DType) -> AttentionSpec {
    let cache = paged(&REAL, 1, 16, BOUND - 129).rotary(rotary(32, BOUND + 1, false));
    let slopes = (0..8).map(|i| 0.02 * (i + 1) as f32).collect();
    spec(8, 2, 1, 128, cache).alibi(slopes, false).dtype(dtype)
}

#[test]
fn decode_reads_device_lengths_and_tables_and_queues_without_waiting() {
    let Some(b) = on_device(BOUND) else {
        return;
    };
    for dtype in [DType::Bf16, DType::F32] {
        let real = problem(dtype);
        let r = check_decode(&b, &real, 61).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "ok   decode on device tables {dtype}: rel L2 {:.2e}, LSE {:.2e}",
            r.rel_l2,
            r.lse_max_abs.unwrap_or(0.0)
        );
        // Refused before any launch: a short rotary table, a small workspace.
        let host = host_of(&real, BOUND);
        let mem = DeviceMem::new();
        let data = DecodeData::random(&real, 61);
        let (mut kc, mut vc) = (data.k_cache.clone(), data.v_cache.clone());
        let inputs = data.inputs((&mut kc, &mut vc));
        let Call { t, tables, bytes } = upload(&b.runner.b, &mem, (&real, &host), &inputs).unwrap();
        assert!(bytes > 0, "rotary q and the split need scratch");
        let short = DecodeDeviceTables {
            rotary_cos: Some(DeviceTable { ptr: t.q, len: 3 }),
            ..tables
        };
        let e = unsafe { b.runner.b.decode_device_with_tables(&host, &t, &short) }.unwrap_err();
        assert!(e.to_string().contains("rotary_cos"), "{e}");
        let small = DecodeDeviceTables {
            workspace: Some(DeviceWorkspace {
                ptr: t.q,
                bytes: bytes - 16,
            }),
            ..tables
        };
        let e = unsafe { b.runner.b.decode_device_with_tables(&host, &t, &small) }.unwrap_err();
        assert!(e.to_string().contains("workspace"), "{e}");
    }
}

/// NaN in q, a cached K row and a new V row: exactly the rows that see it (bf16: the
/// tensor-core kernel, whose key block may carry a NaN V element to rows that mask it; f32:
/// the CUDA-core kernel, exact).
#[test]
fn nan_reaches_exactly_the_rows_that_see_it_on_device_tables() {
    let Some(b) = on_device(BOUND) else {
        return;
    };
    for dtype in [DType::Bf16, DType::F32] {
        check_nans(&b, dtype, dtype != DType::F32, 900).unwrap_or_else(|e| panic!("{dtype}: {e}"));
    }
}

/// 20000 and 33 real keys under a bound of 40000, contiguous and paged (page 256): the
/// bound's plan splits the keys many ways and the combine weighs the splits.
#[test]
fn long_caches_on_device_tables() {
    let Some(b) = on_device(LONG_BOUND) else {
        return;
    };
    for dtype in [DType::Bf16, DType::F32] {
        for (i, (name, real)) in long_cases(dtype).into_iter().enumerate() {
            let r = check_decode(&b, &real, 1000 + i as u64)
                .unwrap_or_else(|e| panic!("{name} ({dtype}): {e}"));
            println!("ok   {name} {dtype}: rel L2 {:.2e}", r.rel_l2);
        }
    }
}
