//! On an NVIDIA GPU: `decode_device_with_tables`, the cache lengths on the device only. The
//! host spec knows a bound of them (`decode_bounds`, 300) and holds zero ALiBi slopes and
//! zero rotary tables; the real lengths (0, 1, 17, 129), slopes and rotary tables are the
//! caller's device tables, the split-KV scratch the caller's workspace
//! (`decode_workspace_bytes`). The call queues on a caller's non-blocking stream without
//! waiting; the test synchronises the stream itself, then compares out, LSE and both caches
//! with the f64 reference of the real problem. Bad tables are refused by name. Without a GPU
//! the test prints why it skips, unless FLASHATTN_REQUIRE_BACKENDS names cuda.

mod common;

use common::device::DeviceMem;
use cudarc::driver::result as drv;
use flashattn_core::testing::backend_or_skip;
use flashattn_core::testing::decode::{paged, rotary, spec, DecodeData};
use flashattn_core::{lse_max_error, rel_l2_error, AttentionSpec, CacheLayout, DType, Tensor};
use flashattn_cuda::{
    decode_bounds, CudaBackend, DecodeDeviceTables, DeviceDecode, DeviceTable, DeviceWorkspace,
};

const REAL: [i32; 4] = [0, 1, 17, 129];
const BOUND: usize = 300;

/// The real problem: paged (page 16) with room for the bound, 1 new row, rotary on 32 of 128,
/// ALiBi per head, GQA 8/2; and its host spec (bounds, zero slopes and rotary tables).
fn problem(dtype: DType) -> (AttentionSpec, AttentionSpec) {
    let cache = paged(&REAL, 1, 16, BOUND - 129).rotary(rotary(32, BOUND + 1, false));
    let slopes = (0..8).map(|i| 0.02 * (i + 1) as f32).collect();
    let real = spec(8, 2, 1, 128, cache).alibi(slopes, false).dtype(dtype);
    let mut host = real.clone();
    let c = host.kv_cache.as_mut().unwrap();
    c.seqlens = decode_bounds(4, BOUND).unwrap();
    let r = c.rotary.as_mut().unwrap();
    r.cos.fill(0.0);
    r.sin.fill(0.0);
    host.alibi.as_mut().unwrap().slopes.fill(0.0);
    (real, host)
}

fn floats(mem: &DeviceMem, v: &[f32]) -> DeviceTable {
    DeviceTable {
        ptr: mem.upload(bytemuck::cast_slice(v)),
        len: v.len(),
    }
}

#[test]
fn decode_reads_device_lengths_and_tables_and_queues_without_waiting() {
    let Some(mut b) = backend_or_skip("cuda", CudaBackend::new) else {
        return;
    };
    let mem = DeviceMem::new();
    let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).unwrap();
    // SAFETY: a live stream of device 0's primary context, destroyed after the last call.
    unsafe { b.set_stream(stream) };
    for dtype in [DType::Bf16, DType::F32] {
        let (real, host) = problem(dtype);
        let data = DecodeData::random(&real, 61);
        let cache = real.kv_cache.as_ref().unwrap();
        let CacheLayout::Paged { block_table, .. } = &cache.layout else {
            unreachable!("a paged cache")
        };
        let out_bytes = real.out_elems().unwrap() * dtype.output().size_bytes();
        let lse_n = real.lse_elems().unwrap();
        let t = DeviceDecode {
            q: mem.upload(data.q.as_ref().as_bytes()),
            k_cache: mem.upload(data.k_cache.as_ref().as_bytes()),
            v_cache: mem.upload(data.v_cache.as_ref().as_bytes()),
            k_new: Some(mem.upload(data.k_new.as_ref().as_bytes())),
            v_new: Some(mem.upload(data.v_new.as_ref().as_bytes())),
            out: mem.upload(&vec![0u8; out_bytes]),
            lse: Some(mem.upload(&vec![0u8; lse_n * 4])),
            seqlens: mem.upload(bytemuck::cast_slice(&REAL)),
            block_table: Some(mem.upload(bytemuck::cast_slice(block_table))),
            batch_idx: None,
        };
        let rot = cache.rotary.as_ref().unwrap();
        let bytes = b.decode_workspace_bytes(&host).unwrap();
        assert!(bytes > 0, "rotary q and the split need scratch");
        let tables = DecodeDeviceTables {
            alibi_slopes: Some(floats(&mem, &real.alibi.as_ref().unwrap().slopes)),
            rotary_cos: Some(floats(&mem, &rot.cos)),
            rotary_sin: Some(floats(&mem, &rot.sin)),
            workspace: Some(DeviceWorkspace {
                ptr: mem.upload(&vec![0u8; bytes]),
                bytes,
            }),
        };
        // SAFETY: every pointer holds its tensor's or table's bytes; all outlive the
        // synchronisation below.
        unsafe { b.decode_device_with_tables(&host, &t, &tables) }.unwrap();
        unsafe { drv::stream::synchronize(stream) }.unwrap();
        let want = data.reference(&real).unwrap();
        let out = Tensor::from_bytes(dtype.output(), &mem.download(t.out, out_bytes)).unwrap();
        let err = rel_l2_error(&out.to_f32_vec(), &want.out);
        assert!(err < dtype.tolerance(), "{real}: out rel L2 {err}");
        let lse: Vec<f32> = bytemuck::pod_collect_to_vec(&mem.download(t.lse.unwrap(), lse_n * 4));
        let lse_err = lse_max_error(&lse, &want.lse);
        assert!(
            lse_err < dtype.lse_tolerance(),
            "{real}: LSE error {lse_err}"
        );
        for (name, p, w, n) in [
            ("k", t.k_cache, &want.k_cache, data.k_cache.len()),
            ("v", t.v_cache, &want.v_cache, data.v_cache.len()),
        ] {
            let got = Tensor::from_bytes(dtype, &mem.download(p, n * dtype.size_bytes())).unwrap();
            // Element by element: an appended row is a small part of the cache.
            let bad =
                got.to_f32_vec().iter().zip(w.iter()).position(|(&g, &e)| {
                    (g as f64 - e).abs() > dtype.tolerance() * e.abs().max(1.0)
                });
            assert!(bad.is_none(), "{real}: {name} cache element {bad:?}");
        }
        println!("ok   decode on device tables {dtype}: rel L2 {err:.2e}, LSE {lse_err:.2e}");
        // Refused before any launch: a short rotary table, a small workspace.
        let short = DecodeDeviceTables {
            rotary_cos: Some(DeviceTable { ptr: t.q, len: 3 }),
            ..tables
        };
        let e = unsafe { b.decode_device_with_tables(&host, &t, &short) }.unwrap_err();
        assert!(e.to_string().contains("rotary_cos"), "{e}");
        let small = DecodeDeviceTables {
            workspace: Some(DeviceWorkspace {
                ptr: t.q,
                bytes: bytes - 16,
            }),
            ..tables
        };
        let e = unsafe { b.decode_device_with_tables(&host, &t, &small) }.unwrap_err();
        assert!(e.to_string().contains("workspace"), "{e}");
    }
    unsafe { b.set_stream(std::ptr::null_mut()) };
    // SAFETY: created above; synchronised after the last call.
    unsafe { drv::stream::destroy(stream) }.unwrap();
}
