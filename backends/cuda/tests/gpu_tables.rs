//! On an NVIDIA GPU: side tables the caller holds on the device (`DeviceTables`). A varlen
//! ALiBi forward on a caller's non-blocking stream reads cu_seqlens and slopes from device
//! memory only: the host spec carries `varlen_bounds` offsets and zero slopes, so a kernel
//! that read the host copies would give a different result. The call queues without waiting;
//! the test synchronises the stream itself. Without a GPU the test prints why it skips, unless
//! FLASHATTN_REQUIRE_BACKENDS names cuda.

mod common;

use common::gpu_backend;
use cudarc::driver::result as drv;
use flashattn_core::{
    random_inputs, reference_attention, reference_backward, rel_l2_error, AttentionSpec, DType,
    ForwardInputs, Pass, Tensor,
};
use flashattn_cuda::{varlen_bounds, BackwardTensors, DeviceTable, DeviceTables, DeviceTensors};

/// The real problem (its offsets and slopes), and the host spec a device-resident caller
/// builds from bounds alone.
fn problem(dtype: DType) -> (AttentionSpec, AttentionSpec) {
    let (cu_q, cu_k) = (vec![0, 33, 34, 90], vec![0, 40, 111, 130]);
    let slopes = vec![0.5, 0.25, 0.125, 0.0625];
    let real = AttentionSpec::new(3, 4, 90, 130, 64)
        .dtype(dtype)
        .varlen(cu_q, cu_k)
        .alibi(slopes, false)
        .causal(true)
        .return_lse(true);
    let (bq, bk) = varlen_bounds(3, (90, 130), (56, 71)).unwrap();
    let host = real.clone().varlen(bq, bk).alibi(vec![0.0; 4], false);
    (real, host)
}

/// The real problem's cu_seqlens and slopes, uploaded as the caller's device tables.
fn upload_tables(mem: &common::device::DeviceMem, real: &AttentionSpec) -> DeviceTables {
    let vl = real.varlen.as_ref().unwrap();
    let table = |bytes: &[u8]| DeviceTable {
        ptr: mem.upload(bytes),
        len: bytes.len() / 4,
    };
    DeviceTables {
        cu_seqlens_q: Some(table(bytemuck::cast_slice(&vl.cu_seqlens_q))),
        cu_seqlens_k: Some(table(bytemuck::cast_slice(&vl.cu_seqlens_k))),
        alibi_slopes: Some(table(bytemuck::cast_slice(
            &real.alibi.as_ref().unwrap().slopes,
        ))),
    }
}

#[test]
fn forward_reads_device_tables_and_queues_without_waiting() {
    let Some(mut b) = gpu_backend(None, Pass::Forward) else {
        return;
    };
    let mem = common::device::DeviceMem::new();
    let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).unwrap();
    // SAFETY: a live stream of device 0's primary context, destroyed after the last call.
    unsafe { b.set_stream(stream) };
    for dtype in [DType::Bf16, DType::F32] {
        let (real, host) = problem(dtype);
        let (q, k, v) = random_inputs(&real, 41);
        let out_bytes = real.out_elems().unwrap() * dtype.output().size_bytes();
        let lse_n = real.lse_elems().unwrap();
        let t = DeviceTensors {
            q: mem.upload(q.as_ref().as_bytes()),
            k: mem.upload(k.as_ref().as_bytes()),
            v: mem.upload(v.as_ref().as_bytes()),
            out: mem.upload(&vec![0u8; out_bytes]),
            lse: Some(mem.upload(bytemuck::cast_slice(&vec![f32::NEG_INFINITY; lse_n]))),
        };
        let tables = upload_tables(&mem, &real);
        assert!(tables.complete(&host));
        // SAFETY: every pointer holds its tensor's or table's bytes; all outlive the
        // synchronisation below.
        unsafe { b.forward_device_with_tables(&host, &t, &tables) }.unwrap();
        unsafe { drv::stream::synchronize(stream) }.unwrap();
        let out = Tensor::from_bytes(dtype.output(), &mem.download(t.out, out_bytes)).unwrap();
        let want = reference_attention(&real, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let err = rel_l2_error(&out.to_f32_vec(), &want.out);
        assert!(err < dtype.tolerance(), "{real}: rel L2 {err}");
        let kind = b.variant_for(&host).unwrap().name();
        println!("ok   device tables {dtype} on {kind}: rel L2 {err:.2e}");
        // A table of the wrong length is refused before any launch.
        let short = DeviceTables {
            cu_seqlens_k: Some(DeviceTable { ptr: t.q, len: 3 }),
            ..tables
        };
        let e = unsafe { b.forward_device_with_tables(&host, &t, &short) }.unwrap_err();
        assert!(e.to_string().contains("cu_seqlens_k"), "{e}");
    }
    unsafe { b.set_stream(std::ptr::null_mut()) };
    // SAFETY: created above; synchronised after the last call.
    unsafe { drv::stream::destroy(stream) }.unwrap();
}

#[test]
fn backward_reads_device_tables() {
    let Some(b) = gpu_backend(None, Pass::Backward) else {
        return;
    };
    let mem = common::device::DeviceMem::new();
    let (real, host) = problem(DType::Bf16);
    let (q, k, v) = random_inputs(&real, 43);
    let fwd = flashattn_core::Backend::forward(&b, &real, ForwardInputs::of(&q, &k, &v)).unwrap();
    let lse = fwd.lse.clone().unwrap();
    let (dout, _, _) = random_inputs(&real, 44);
    let grad_bytes = |n: Option<usize>| vec![0u8; n.unwrap() * 2];
    let t = BackwardTensors {
        q: mem.upload(q.as_ref().as_bytes()),
        k: mem.upload(k.as_ref().as_bytes()),
        v: mem.upload(v.as_ref().as_bytes()),
        out: mem.upload(fwd.out.as_ref().as_bytes()),
        lse: mem.upload(bytemuck::cast_slice(&lse)),
        dout: mem.upload(dout.as_ref().as_bytes()),
        dq: mem.upload(&grad_bytes(real.q_elems())),
        dk: mem.upload(&grad_bytes(real.k_elems())),
        dv: mem.upload(&grad_bytes(real.v_elems())),
    };
    let tables = upload_tables(&mem, &real);
    // SAFETY: every pointer holds its tensor's or table's bytes; the call waits.
    unsafe { b.backward_device_with_tables(&host, &t, &tables) }.unwrap();
    let want =
        reference_backward(&real, q.as_ref(), k.as_ref(), v.as_ref(), dout.as_ref()).unwrap();
    for (name, p, n, w) in [
        ("dq", t.dq, real.q_elems(), &want.dq),
        ("dk", t.dk, real.k_elems(), &want.dk),
        ("dv", t.dv, real.v_elems(), &want.dv),
    ] {
        let g = Tensor::from_bytes(DType::Bf16, &mem.download(p, n.unwrap() * 2)).unwrap();
        let err = rel_l2_error(&g.to_f32_vec(), w);
        let tol = flashattn_core::testing::backward_tolerance(DType::Bf16);
        assert!(err < tol, "{real}: {name} rel L2 {err}");
    }
}
