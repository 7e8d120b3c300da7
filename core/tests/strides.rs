//! Strided input views: what `validate_inputs` accepts and the errors it names.

use flashattn_core::{
    validate_backward_inputs, validate_inputs, AttentionSpec, BackwardInputs, Error, InputStrides,
    KvCache, Strides, TensorRef,
};

/// q, k, v of a packed `[b, s, 3, h, d]` buffer: slices at head offsets 0, h*d, 2*h*d.
fn packed(b: usize, s: usize, h: usize, d: usize) -> (AttentionSpec, Strides, Vec<f32>) {
    let st = Strides::new(s * 3 * h * d, 3 * h * d, d);
    let spec = AttentionSpec::new(b, h, s, s, d);
    (spec, st, vec![0.5; b * s * 3 * h * d])
}

fn all(st: Strides) -> InputStrides {
    InputStrides {
        q: Some(st),
        k: Some(st),
        v: Some(st),
        out: None,
        dout: None,
    }
}

#[test]
fn packed_qkv_views_are_accepted() {
    let (b, s, h, d) = (3, 17, 2, 40);
    let (spec, st, buf) = packed(b, s, h, d);
    let spec = spec.strides(all(st));
    let view = |i: usize| TensorRef::F32(&buf[i * h * d..]);
    validate_inputs(&spec, &view(0), &view(1), &view(2)).unwrap();
    assert!(!spec.strides.is_contiguous());
    assert!(spec.contiguous().strides.is_contiguous());
}

#[test]
fn a_view_past_the_buffer_names_the_strides() {
    let (b, s, h, d) = (2, 5, 2, 8);
    let (spec, st, buf) = packed(b, s, h, d);
    let spec = spec.strides(all(st));
    // v sliced one element too far: its last row ends one past the end.
    let q = TensorRef::F32(&buf);
    let v = TensorRef::F32(&buf[2 * h * d + 1..]);
    let err = validate_inputs(&spec, &q, &q, &v).unwrap_err();
    match &err {
        Error::InvalidArgument {
            argument, value, ..
        } => {
            assert_eq!(*argument, "strides.v");
            assert!(value.contains(&format!("seq: {}", 3 * h * d)), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("past the buffer"), "{err}");
}

#[test]
fn huge_strides_are_an_error_not_an_overflow() {
    let spec = AttentionSpec::new(3, 2, 4, 4, 8);
    let huge = Strides::new(usize::MAX / 2, 1, 8);
    let spec = spec.strides(InputStrides {
        k: Some(huge),
        ..Default::default()
    });
    let x = vec![0.0f32; 3 * 4 * 2 * 8];
    let t = TensorRef::F32(&x);
    let err = validate_inputs(&spec, &t, &t, &t).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("strides.k") && text.contains("overflows"),
        "{text}"
    );
    assert!(text.contains(&(usize::MAX / 2).to_string()), "{text}");
}

#[test]
fn transposed_views_and_varlen_token_strides() {
    // [b, h, s, d] read as [b, s, h, d]: batch h*s*d, seq d, head s*d.
    let (b, h, s, d) = (2, 3, 7, 8);
    let st = Strides::new(h * s * d, d, s * d);
    let spec = AttentionSpec::new(b, h, s, s, d).strides(all(st));
    let x = vec![0.0f32; b * h * s * d];
    let t = TensorRef::F32(&x);
    validate_inputs(&spec, &t, &t, &t).unwrap();
    let short = TensorRef::F32(&x[..x.len() - 1]);
    assert!(validate_inputs(&spec, &short, &t, &t).is_err());

    // Varlen: only the token and head strides count (batch is ignored).
    let varlen = AttentionSpec::new(2, h, 10, 10, d)
        .varlen(vec![0, 4, 10], vec![0, 6, 10])
        .strides(all(Strides::new(usize::MAX, 2 * h * d, d)));
    let y = vec![0.0f32; 10 * 2 * h * d];
    let t = TensorRef::F32(&y);
    validate_inputs(&varlen, &t, &t, &t).unwrap();
}

#[test]
fn backward_out_and_dout_strides_are_checked() {
    let (b, s, h, d) = (1, 6, 2, 8);
    let spec = AttentionSpec::new(b, h, s, s, d).return_lse(true);
    let x = vec![0.0f32; b * s * h * d];
    let wide = vec![0.0f32; 2 * b * s * h * d];
    let lse = vec![0.0f32; b * h * s];
    let st = Strides::new(2 * s * h * d, 2 * h * d, d);
    let ok = spec.clone().strides(InputStrides {
        out: Some(st),
        dout: Some(st),
        ..Default::default()
    });
    let t = TensorRef::F32(&x);
    let w = TensorRef::F32(&wide);
    let bw = |out, dout| BackwardInputs {
        q: t,
        k: t,
        v: t,
        out,
        lse: &lse,
        dout,
    };
    validate_backward_inputs(&ok, &bw(w, w)).unwrap();
    let err = validate_backward_inputs(&ok, &bw(w, t)).unwrap_err();
    assert!(err.to_string().contains("strides.dout"), "{err}");
}

#[test]
fn decode_takes_strides_for_q_only() {
    let cache = KvCache::contiguous(1, 8, vec![4]);
    let spec = AttentionSpec::new(1, 2, 1, 8, 8)
        .kv_cache(cache)
        .strides(InputStrides {
            k: Some(Strides::contiguous(8, 2, 8)),
            ..Default::default()
        });
    let err = spec.validate().and_then(|_| {
        flashattn_core::validate_decode_step(&spec, &TensorRef::F32(&[0.0; 16]), None, None)
    });
    assert!(err.unwrap_err().to_string().contains("q only"));
}

#[test]
fn the_reference_refuses_strided_specs() {
    let st = Strides::contiguous(4, 1, 8);
    let spec = AttentionSpec::new(1, 1, 4, 4, 8).strides(all(st));
    let x = vec![0.0f32; 32];
    let t = TensorRef::F32(&x);
    let err = flashattn_core::reference_attention(&spec, t, t, t).unwrap_err();
    assert!(err.to_string().contains("contiguous"), "{err}");
    flashattn_core::reference_attention(&spec.contiguous(), t, t, t).unwrap();
}
