//! Strided inputs on wgpu: transposed `[b, h, s, d]` views, padded rows and packed qkv
//! `[b, s, heads_q + 2 heads_kv, d]` give the same out, LSE, gradients and decode output, bit
//! for bit, as the same problem with contiguous inputs, and match the f64 reference. Elements
//! outside each view are NaN, so a kernel reading outside its view shows up as NaN. Strided
//! inputs are bound whole: next to chunked contiguous tensors they still give the same
//! results, and one too large for a binding is refused, naming it.

mod common;

use flashattn_core::testing::decode::{self, DecodeData};
use flashattn_core::testing::strided::{
    self, cases, strided_copy, strided_inputs, with_dtype, Layout, Packed, StridedInputs,
};
use flashattn_core::{
    random_inputs, random_tensor, reference_attention, rel_l2_error, AttentionSpec, Backend,
    BackwardInputs, DType, Error, ForwardInputs, InputStrides, Tensor,
};
use flashattn_wgpu::{BufferSlice, DeviceInputs, DeviceOutputs, WgpuBackend};
use rand::SeedableRng;

/// Transposed, and rows padded by NaN as one part of a packed buffer sees them (an odd pad:
/// odd token strides, so bf16 rows start in either half of a word).
const LAYOUTS: [Layout; 3] = [
    Layout::Transposed,
    Layout::Padded(2 * 72 + 8),
    Layout::Padded(3),
];

/// The forward of `s` equals the contiguous one, bitwise; `want` is the reference's out.
fn forward_equal(b: &dyn Backend, s: &StridedInputs, plain: &flashattn_core::Output, what: &str) {
    let got = b
        .forward(&s.spec, ForwardInputs::of(&s.q, &s.k, &s.v))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        got == *plain,
        "{what}: strided output differs from contiguous"
    );
}

/// The shared strided checks, and packed qkv where the shapes allow it.
fn check_forward(b: &dyn Backend, spec: &AttentionSpec, seed: u64) {
    let ((q, k, v), plain) = strided::check_forward(b, spec, &LAYOUTS, seed);
    if spec.seqlen_q == spec.seqlen_k && spec.head_dim == spec.head_dim_v {
        let p = Packed::new(spec, (&q, &k, &v), 3);
        let got = b
            .forward(&p.spec, p.inputs())
            .unwrap_or_else(|e| panic!("{spec} packed: {e}"));
        assert!(
            got == plain,
            "{spec} packed: output differs from contiguous"
        );
    }
}

#[test]
fn strided_forward_equals_contiguous() {
    let Some(b) = common::backend() else { return };
    for (i, case) in cases().iter().enumerate() {
        for dtype in common::dtypes(b) {
            check_forward(b, &with_dtype(case, dtype), 7 + i as u64);
        }
    }
}

#[test]
fn strided_backward_equals_contiguous() {
    let Some(b) = common::backend() else { return };
    for (i, case) in cases().iter().enumerate() {
        for dtype in [DType::F32, DType::Bf16] {
            strided::check_backward(b, &with_dtype(case, dtype), &LAYOUTS, 70 + i as u64);
        }
    }
}

/// Packed qkv through the backward: q, k, v of one buffer; out and dout padded.
#[test]
fn packed_qkv_backward_equals_contiguous() {
    let Some(b) = common::backend() else { return };
    let spec = AttentionSpec::new(2, 4, 17, 17, 40)
        .heads_kv(2)
        .causal(true)
        .return_lse(true);
    let (q, k, v) = random_inputs(&spec, 11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let dout = random_tensor(&mut rng, spec.dtype.output(), spec.out_elems().unwrap());
    let fwd = b.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
    let lse = fwd.lse.clone().unwrap();
    let plain = b
        .backward(
            &spec,
            BackwardInputs::of((&q, &k, &v), &fwd.out, &lse, &dout),
        )
        .unwrap();
    let p = Packed::new(&spec, (&q, &k, &v), 0);
    let dims = (spec.batch, spec.seqlen_q, spec.heads_q, spec.head_dim_v);
    let (o, os) = strided_copy(&fwd.out, dims, Layout::Padded(5));
    let (g, gs) = strided_copy(&dout, dims, Layout::Transposed);
    let mut st = p.spec.strides;
    (st.out, st.dout) = (Some(os), Some(gs));
    let ForwardInputs {
        q: qa,
        k: ka,
        v: va,
    } = p.inputs();
    let got = b
        .backward(
            &spec.clone().strides(st),
            BackwardInputs {
                q: qa,
                k: ka,
                v: va,
                out: o.as_ref(),
                lse: &lse,
                dout: g.as_ref(),
            },
        )
        .unwrap();
    assert!(got == plain, "packed qkv gradients differ");
}

#[test]
fn decode_reads_a_strided_q() {
    let Some(b) = common::backend() else { return };
    for (sq, d, cache) in [
        (3, 40, decode::contiguous(&[17, 29], 0, 2)),
        (1, 72, decode::paged(&[129, 1], 2, 16, 3)),
    ] {
        let spec = decode::spec(4, 2, sq, d, cache);
        let data = DecodeData::random(&spec, 3);
        let run = |spec: &AttentionSpec, q: &Tensor| {
            let (mut kc, mut vc) = (data.k_cache.clone(), data.v_cache.clone());
            let inputs = flashattn_core::DecodeInputs::of(q, (&mut kc, &mut vc), data.new_rows());
            b.decode(spec, inputs)
        };
        let plain = run(&spec, &data.q).unwrap();
        let want = data.reference(&spec).unwrap();
        let err = rel_l2_error(&plain.out.to_f32_vec(), &want.out);
        assert!(
            err <= spec.dtype.tolerance(),
            "decode {spec}: rel L2 {err:.2e}"
        );
        let batch = spec.batch;
        for layout in LAYOUTS {
            let (qs, st) = strided_copy(&data.q, (batch, sq, 4, d), layout);
            let strided = spec.clone().strides(InputStrides {
                q: Some(st),
                ..Default::default()
            });
            let got = run(&strided, &qs).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
            assert!(got == plain, "decode {spec} {layout:?}: output differs");
        }
    }
}

/// `s` with only the inputs named in `strided` ("q", "k", "v", "out", "dout") left strided:
/// the others back to the contiguous `plain` tensors (q, k, v, out, dout).
fn only(mut s: StridedInputs, plain: [&Tensor; 5], strided: &[&str]) -> StridedInputs {
    let mut st = s.spec.strides;
    let keep = |name: &str| strided.contains(&name);
    if !keep("q") {
        (st.q, s.q) = (None, plain[0].clone());
    }
    if !keep("k") {
        (st.k, s.k) = (None, plain[1].clone());
    }
    if !keep("v") {
        (st.v, s.v) = (None, plain[2].clone());
    }
    if !keep("out") {
        (st.out, s.out) = (None, Some(plain[3].clone()));
    }
    if !keep("dout") {
        (st.dout, s.dout) = (None, Some(plain[4].clone()));
    }
    s.spec = s.spec.contiguous().strides(st);
    s
}

/// Under a 64 KiB binding limit the contiguous tensors are cut into token chunks while a
/// strided one is bound whole: forward and backward give the same results as contiguous on
/// that backend. A strided input larger than a binding is refused, naming it.
#[test]
fn strided_inputs_next_to_chunked_tensors() {
    let Some(b) = common::backend_with_binding_limit(64 << 10) else {
        return;
    };
    // Long keys (k, v chunked) with strided q, out, dout; long queries (q, out, dout
    // chunked) with strided k, v.
    let q_side: &[&str] = &["q", "out", "dout"];
    let k_side: &[&str] = &["k", "v"];
    let cases: [(AttentionSpec, &[&str], &[&str]); 4] = [
        (
            AttentionSpec::new(1, 2, 17, 1000, 40).causal(true),
            q_side,
            k_side,
        ),
        (
            AttentionSpec::new(2, 2, 500, 17, 40).heads_kv(1),
            k_side,
            q_side,
        ),
        // A small strided tensor on a chunked side (its big neighbour is chunked).
        // (Two heads: one head of one sequence transposed is the contiguous layout.)
        (
            AttentionSpec::new(1, 2, 17, 1000, 8).head_dim_v(256),
            &["k"],
            &["v"],
        ),
        (
            AttentionSpec::new(1, 2, 1000, 17, 8).head_dim_v(256),
            &["q"],
            &["out", "dout"],
        ),
    ];
    for (spec, short, long) in cases {
        let spec = spec.return_lse(true);
        let (q, k, v) = random_inputs(&spec, 5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let dout = random_tensor(&mut rng, spec.dtype.output(), spec.out_elems().unwrap());
        let fwd = b.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
        let want = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let err = rel_l2_error(&fwd.out.to_f32_vec(), &want.out);
        assert!(err <= spec.dtype.tolerance(), "{spec}: rel L2 {err:.2e}");
        let lse = fwd.lse.clone().unwrap();
        let backward = |s: &StridedInputs| {
            let (o, g) = (s.out.as_ref().unwrap(), s.dout.as_ref().unwrap());
            b.backward(&s.spec, BackwardInputs::of((&s.q, &s.k, &s.v), o, &lse, g))
        };
        let all = [&q, &k, &v, &fwd.out, &dout];
        let only_strided = |names: &[&str]| {
            let s = strided_inputs(
                &spec,
                (&q, &k, &v),
                Some((&fwd.out, &dout)),
                Layout::Transposed,
            );
            only(s, all, names)
        };
        let contiguous = only_strided(&[]);
        let grads = backward(&contiguous).unwrap();
        let s = only_strided(short);
        forward_equal(&b, &s, &fwd, &format!("{spec} strided {short:?}"));
        let got = backward(&s).unwrap_or_else(|e| panic!("{spec} strided {short:?}: {e}"));
        assert!(got == grads, "{spec} strided {short:?}: gradients differ");
        // The long side strided: too large for a binding.
        for name in long {
            let wide = only_strided(&[name]);
            let ran = match *name {
                "out" | "dout" => backward(&wide).err(),
                _ => b
                    .forward(&wide.spec, ForwardInputs::of(&wide.q, &wide.k, &wide.v))
                    .err(),
            };
            let err = ran.unwrap_or_else(|| panic!("{spec}: a too large strided {name} ran"));
            assert!(matches!(err, Error::Unsupported { .. }), "{spec}: {err}");
            assert!(
                err.to_string().contains(&format!("strided {name} ")),
                "{err}"
            );
            assert!(b.supports_backward(&wide.spec).is_err());
        }
    }
}

/// The device path: strided buffers on the device give the contiguous result; a slice
/// shorter than the strided view's reach is an error naming the tensor.
#[test]
fn device_path_reads_strided_buffers() {
    let Some(b) = common::backend() else { return };
    let spec = AttentionSpec::new(2, 4, 17, 33, 40)
        .heads_kv(2)
        .causal(true);
    let (q, k, v) = random_inputs(&spec, 9);
    let s = strided_inputs(&spec, (&q, &k, &v), None, Layout::Transposed);
    let want = b.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
    let dev = b.device_handle();
    let buf = |t: &Tensor| buffer(b, t.as_ref().as_bytes());
    let (qb, kb, vb) = (buf(&s.q), buf(&s.k), buf(&s.v));
    let out_bytes = (spec.out_elems().unwrap() * 4) as u64;
    let out = dev.create_buffer(&flashattn_wgpu::wgpu::BufferDescriptor {
        label: None,
        size: out_bytes,
        usage: flashattn_wgpu::wgpu::BufferUsages::STORAGE
            | flashattn_wgpu::wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let outputs = DeviceOutputs {
        out: (&out).into(),
        lse: None,
    };
    let inputs = DeviceInputs {
        q: (&qb).into(),
        k: (&kb).into(),
        v: (&vb).into(),
    };
    pollster::block_on(b.forward_buffers(&s.spec, inputs, outputs)).unwrap();
    let bytes = common::read_back(dev, b.queue(), &out);
    assert!(bytes == want.out.as_ref().as_bytes(), "device path differs");
    // One element short of the transposed k's reach.
    let short = BufferSlice {
        size: kb.size() - 4,
        ..BufferSlice::from(&kb)
    };
    let err = pollster::block_on(b.forward_buffers(
        &s.spec,
        DeviceInputs { k: short, ..inputs },
        outputs,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("k:"), "{err}");
}

fn buffer(b: &WgpuBackend, bytes: &[u8]) -> flashattn_wgpu::wgpu::Buffer {
    let usage =
        flashattn_wgpu::wgpu::BufferUsages::STORAGE | flashattn_wgpu::wgpu::BufferUsages::COPY_DST;
    let buf = b
        .device_handle()
        .create_buffer(&flashattn_wgpu::wgpu::BufferDescriptor {
            label: None,
            size: (bytes.len() as u64).next_multiple_of(4),
            usage,
            mapped_at_creation: false,
        });
    b.queue().write_buffer(&buf, 0, bytes);
    buf
}
