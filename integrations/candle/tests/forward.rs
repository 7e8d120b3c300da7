//! Every function against attention written with candle ops, on fresh random inputs at odd
//! sizes, f32 / f16 / bf16, on candle's CPU device.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{attention, attention_varlen, lse_err, rand, rel_err, tolerance, Opts};
use flashattn_candle as fa;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// One dense problem: q `(b, sq, hq, d)`, k `(b, sk, hkv, d)`, v `(b, sk, hkv, dv)`.
struct Dense {
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
}

impl Dense {
    fn inputs(&self, dtype: DType) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            rand(&[self.b, self.sq, self.hq, self.d], dtype)?,
            rand(&[self.b, self.sk, self.hkv, self.d], dtype)?,
            rand(&[self.b, self.sk, self.hkv, self.dv], dtype)?,
        ))
    }
}

fn slopes(hq: usize) -> Vec<f32> {
    (0..hq).map(|h| 0.5f32.powi(h as i32 + 1)).collect()
}

/// Runs `f` on fresh inputs in every dtype and checks it against the candle-ops attention.
fn check_dense(
    name: &str,
    p: &Dense,
    o: &Opts,
    f: impl Fn(&Tensor, &Tensor, &Tensor, f32) -> Result<Tensor>,
) -> Result<()> {
    let scale = 1.0 / (p.d as f32).sqrt();
    for dtype in DTYPES {
        let (q, k, v) = p.inputs(dtype)?;
        let out = f(&q, &k, &v, scale)?;
        assert_eq!(out.dtype(), dtype);
        assert_eq!(out.dims(), [p.b, p.sq, p.hq, p.dv]);
        let (expected, _) = attention(&q, &k, &v, scale, o)?;
        let err = rel_err(&out, &expected)?;
        println!("{name} {dtype:?}: rel L2 error {err:.2e}");
        assert!(err < tolerance(dtype), "{name} {dtype:?}: error {err}");
    }
    Ok(())
}

const GQA: Dense = Dense {
    b: 2,
    sq: 17,
    sk: 129,
    hq: 6,
    hkv: 2,
    d: 40,
    dv: 40,
};

/// More queries than keys: with bottom-right causal alignment the first rows see nothing.
const TALL: Dense = Dense {
    b: 1,
    sq: 129,
    sk: 17,
    hq: 3,
    hkv: 3,
    d: 72,
    dv: 72,
};

#[test]
fn flash_attn_matches_candle_ops() -> Result<()> {
    let plain = Opts::default();
    check_dense("gqa", &GQA, &plain, |q, k, v, s| {
        fa::flash_attn(q, k, v, s, false)
    })?;
    let causal = Opts {
        window: (None, Some(0)),
        ..Opts::default()
    };
    check_dense("gqa causal", &GQA, &causal, |q, k, v, s| {
        fa::flash_attn(q, k, v, s, true)
    })?;
    check_dense("tall causal", &TALL, &causal, |q, k, v, s| {
        fa::flash_attn(q, k, v, s, true)
    })?;
    let mqa_dv = Dense {
        b: 1,
        sq: 1,
        sk: 200,
        hq: 4,
        hkv: 1,
        d: 40,
        dv: 72,
    };
    check_dense("mqa dv!=d", &mqa_dv, &plain, |q, k, v, s| {
        fa::flash_attn(q, k, v, s, false)
    })?;
    // A few queries against tens of thousands of keys (a long prompt's last tokens).
    let long = Dense {
        b: 1,
        sq: 3,
        sk: 20011,
        hq: 4,
        hkv: 2,
        d: 64,
        dv: 64,
    };
    check_dense("long keys causal", &long, &causal, |q, k, v, s| {
        fa::flash_attn(q, k, v, s, true)
    })
}

#[test]
fn windowed_and_softcap_match_candle_ops() -> Result<()> {
    let window = (Some(5), Some(3));
    let o = Opts {
        window,
        ..Opts::default()
    };
    check_dense("window", &GQA, &o, |q, k, v, s| {
        fa::flash_attn_windowed(q, k, v, s, window.0, window.1)
    })?;
    let left_only = (Some(5), None);
    let o = Opts {
        window: left_only,
        softcap: 5.0,
        ..Opts::default()
    };
    check_dense("left window softcap", &TALL, &o, |q, k, v, s| {
        fa::flash_attn_alibi_windowed_softcap(q, k, v, None, s, left_only.0, left_only.1, 5.0)
    })
}

#[test]
fn alibi_matches_candle_ops() -> Result<()> {
    let hq = GQA.hq;
    let sl = || Tensor::new(slopes(hq), &Device::Cpu);
    let causal = Opts {
        window: (None, Some(0)),
        alibi: Some(slopes(hq)),
        ..Opts::default()
    };
    check_dense("alibi causal", &GQA, &causal, |q, k, v, s| {
        fa::flash_attn_alibi(q, k, v, &sl()?, s, true)
    })?;
    let window = (Some(7), Some(0));
    let o = Opts {
        window,
        alibi: Some(slopes(hq)),
        ..Opts::default()
    };
    check_dense("alibi window", &GQA, &o, |q, k, v, s| {
        fa::flash_attn_alibi_windowed(q, k, v, &sl()?, s, window.0, window.1)
    })?;
    let o = Opts { softcap: 3.0, ..o };
    check_dense("alibi window softcap", &GQA, &o, |q, k, v, s| {
        fa::flash_attn_alibi_windowed_softcap(q, k, v, Some(&sl()?), s, window.0, window.1, 3.0)
    })
}

#[test]
fn lse_matches_candle_ops_with_empty_rows() -> Result<()> {
    let p = &TALL;
    let scale = 0.3;
    let (q, k, v) = p.inputs(DType::F32)?;
    let (out, lse) = fa::flash_attn_with_lse(&q, &k, &v, None, scale, None, Some(0), 0.0)?;
    let o = Opts {
        window: (None, Some(0)),
        ..Opts::default()
    };
    let (e_out, e_lse) = attention(&q, &k, &v, scale, &o)?;
    assert_eq!(lse.dims(), [p.b, p.hq, p.sq]);
    assert!(rel_err(&out, &e_out)? < tolerance(DType::F32));
    assert!(lse_err(&lse, &e_lse)? < 1e-4);
    // Row 0 sees no key (sq > sk, bottom-right causal): out 0, LSE -inf.
    let row0 = lse.narrow(2, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(row0.iter().all(|x| *x == f32::NEG_INFINITY), "{row0:?}");
    let out0 = out.narrow(1, 0, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    assert_eq!(out0, 0.0);
    Ok(())
}

#[test]
fn transposed_and_offset_views_match() -> Result<()> {
    // Models keep (b, h, s, d) and pass transposed views; a narrow adds a start offset.
    let (b, h, sq, sk, d) = (2, 4, 33, 47, 40);
    let scale = 0.2;
    let o = Opts {
        window: (None, Some(0)),
        ..Opts::default()
    };
    for dtype in DTYPES {
        let q = rand(&[b, h, sq, d], dtype)?.transpose(1, 2)?;
        let k = rand(&[b, h, sk + 3, d], dtype)?
            .narrow(2, 3, sk)?
            .transpose(1, 2)?;
        let v = rand(&[b, h, sk, d], dtype)?.transpose(1, 2)?;
        assert!(!q.is_contiguous() && !k.is_contiguous());
        let out = fa::flash_attn(&q, &k, &v, scale, true)?;
        let (expected, _) = attention(&q, &k, &v, scale, &o)?;
        let err = rel_err(&out, &expected)?;
        assert!(err < tolerance(dtype), "{dtype:?}: {err}");
        let same = fa::flash_attn(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            scale,
            true,
        )?;
        assert_eq!(
            rel_err(&out, &same)?,
            0.0,
            "{dtype:?}: views differ from copies"
        );
    }
    Ok(())
}

/// Varlen problem: sequences of 17, 1 and 32 queries against 5, 40 and 32 keys.
const CU_Q: [u32; 4] = [0, 17, 18, 50];
const CU_K: [u32; 4] = [0, 5, 45, 77];

#[test]
fn varlen_functions_match_candle_ops() -> Result<()> {
    let (hq, hkv, d) = (4, 2, 72);
    let (tq, tk) = (CU_Q[3] as usize, CU_K[3] as usize);
    let dev = Device::Cpu;
    let (cq, ck) = (Tensor::new(&CU_Q, &dev)?, Tensor::new(&CU_K, &dev)?);
    let sl = Tensor::new(slopes(hq), &dev)?;
    let scale = 1.0 / (d as f32).sqrt();
    let (mq, mk) = (32, 40);
    for dtype in DTYPES {
        let (q, k, v) = (
            rand(&[tq, hq, d], dtype)?,
            rand(&[tk, hkv, d], dtype)?,
            rand(&[tk, hkv, d], dtype)?,
        );
        let check = |name: &str, out: Tensor, o: Opts| -> Result<()> {
            let (expected, _) = attention_varlen(&q, &k, &v, &CU_Q, &CU_K, scale, &o)?;
            assert_eq!(out.dims(), [tq, hq, d]);
            let err = rel_err(&out, &expected)?;
            println!("varlen {name} {dtype:?}: rel L2 error {err:.2e}");
            assert!(err < tolerance(dtype), "varlen {name} {dtype:?}: {err}");
            Ok(())
        };
        let causal = (None, Some(0));
        let window = (Some(6), Some(2));
        let with = |window, alibi: bool, softcap| Opts {
            window,
            alibi: alibi.then(|| slopes(hq)),
            softcap,
        };
        let out = fa::flash_attn_varlen(&q, &k, &v, &cq, &ck, mq, mk, scale, true)?;
        check("causal", out, with(causal, false, 0.0))?;
        let out = fa::flash_attn_varlen_windowed(
            &q, &k, &v, &cq, &ck, mq, mk, scale, window.0, window.1,
        )?;
        check("window", out, with(window, false, 0.0))?;
        let out = fa::flash_attn_varlen_alibi(&q, &k, &v, &sl, &cq, &ck, mq, mk, scale, false)?;
        check("alibi", out, with((None, None), true, 0.0))?;
        let out = fa::flash_attn_varlen_alibi_windowed(
            &q, &k, &v, &sl, &cq, &ck, mq, mk, scale, window.0, window.1,
        )?;
        check("alibi window", out, with(window, true, 0.0))?;
        let out = fa::flash_attn_varlen_alibi_windowed_softcap(
            &q,
            &k,
            &v,
            Some(&sl),
            &cq,
            &ck,
            mq,
            mk,
            scale,
            None,
            Some(0),
            4.0,
        )?;
        check("alibi causal softcap", out, with(causal, true, 4.0))?;
    }
    Ok(())
}

#[test]
fn varlen_lse_matches_candle_ops() -> Result<()> {
    let (hq, d) = (2, 40);
    let (tq, tk) = (CU_Q[3] as usize, CU_K[3] as usize);
    let dev = Device::Cpu;
    // i64 offsets work as well as candle-flash-attn's u32.
    let cq = Tensor::new(&CU_Q, &dev)?.to_dtype(DType::I64)?;
    let ck = Tensor::new(&CU_K, &dev)?;
    let (q, k, v) = (
        rand(&[tq, hq, d], DType::F32)?,
        rand(&[tk, hq, d], DType::F32)?,
        rand(&[tk, hq, d], DType::F32)?,
    );
    let (out, lse) = fa::flash_attn_varlen_with_lse(
        &q,
        &k,
        &v,
        None,
        &cq,
        &ck,
        32,
        40,
        0.3,
        None,
        Some(0),
        0.0,
    )?;
    let o = Opts {
        window: (None, Some(0)),
        ..Opts::default()
    };
    let (e_out, e_lse) = attention_varlen(&q, &k, &v, &CU_Q, &CU_K, 0.3, &o)?;
    assert_eq!(lse.dims(), [hq, tq]);
    assert!(rel_err(&out, &e_out)? < tolerance(DType::F32));
    assert!(lse_err(&lse, &e_lse)? < 1e-4);
    Ok(())
}

/// The error of `r`, which must be one.
fn error_of(r: Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.shape()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_give_errors_naming_the_value() -> Result<()> {
    let f32s = |s: &[usize]| rand(s, DType::F32);
    let (q, k, v) = (
        f32s(&[1, 5, 4, 8])?,
        f32s(&[1, 6, 2, 8])?,
        f32s(&[1, 6, 2, 8])?,
    );
    let dev = Device::Cpu;
    let cases: Vec<(Result<Tensor>, &str)> = vec![
        (fa::flash_attn(&q.squeeze(0)?, &k, &v, 1.0, false), "rank 4"),
        (
            fa::flash_attn(&q, &f32s(&[2, 6, 2, 8])?, &v, 1.0, false),
            "batch sizes",
        ),
        (
            fa::flash_attn(&q, &k, &f32s(&[1, 7, 2, 8])?, 1.0, false),
            "seqlens of k and v",
        ),
        (
            fa::flash_attn(&q, &f32s(&[1, 6, 3, 8])?, &f32s(&[1, 6, 3, 8])?, 1.0, false),
            "heads_kv = 3",
        ),
        (
            fa::flash_attn(&q, &k.to_dtype(DType::F16)?, &v, 1.0, false),
            "dtypes differ",
        ),
        (
            fa::flash_attn(
                &q.to_dtype(DType::F64)?,
                &k.to_dtype(DType::F64)?,
                &v.to_dtype(DType::F64)?,
                1.0,
                false,
            ),
            "F64",
        ),
        (fa::flash_attn(&q, &k, &v, -1.0, false), "scale = -1"),
        (fa::flash_attn(&q, &k, &v, f32::NAN, false), "scale = NaN"),
        (
            fa::flash_attn_alibi_windowed_softcap(&q, &k, &v, None, 1.0, None, None, -2.0),
            "softcap = -2",
        ),
        (
            fa::flash_attn_alibi(&q, &k, &v, &Tensor::new(&[0.5f32; 3], &dev)?, 1.0, false),
            "3 slopes",
        ),
        (
            fa::flash_attn_alibi(&q, &k, &v, &Tensor::new(&[1u32; 4], &dev)?, 1.0, false),
            "expected f32",
        ),
        (
            fa::flash_attn(
                &f32s(&[1, 5, 4, 300])?,
                &f32s(&[1, 6, 2, 300])?,
                &f32s(&[1, 6, 2, 300])?,
                1.0,
                false,
            ),
            "head_dim = 300",
        ),
    ];
    assert_each_names(cases);
    Ok(())
}

/// Asserts that each result is an error whose message contains its needle.
fn assert_each_names(cases: Vec<(Result<Tensor>, &str)>) {
    for (r, needle) in cases {
        let msg = error_of(r);
        assert!(
            msg.contains(needle),
            "error {msg:?} does not name {needle:?}"
        );
    }
}

#[test]
fn bad_varlen_offsets_give_errors_naming_the_value() -> Result<()> {
    let dev = Device::Cpu;
    let f32s = |s: &[usize]| rand(s, DType::F32);
    let (vq, vk) = (f32s(&[9, 4, 8])?, f32s(&[9, 2, 8])?);
    let cu = |x: &[u32]| Tensor::new(x, &dev);
    let varlen = |cq: &Tensor, ck: &Tensor, mq, mk| {
        fa::flash_attn_varlen(&vq, &vk, &vk, cq, ck, mq, mk, 1.0, false)
    };
    let varlen_cases: Vec<(Result<Tensor>, &str)> = vec![
        (
            varlen(&cu(&[0, 4, 9])?, &cu(&[0, 5])?, 5, 5),
            "cu_seqlens_k = 2 offsets",
        ),
        (
            varlen(&cu(&[0, 4, 10])?, &cu(&[0, 5, 9])?, 6, 5),
            "cu_seqlens_q[2] = 10",
        ),
        (
            varlen(&cu(&[0, 5, 4])?, &cu(&[0, 5, 9])?, 5, 5),
            "cu_seqlens_q[2] = 4 < cu_seqlens_q[1] = 5",
        ),
        (
            varlen(&cu(&[0, 4, 9])?, &cu(&[0, 5, 9])?, 4, 5),
            "max_seqlen_q = 4",
        ),
        (
            varlen(&cu(&[0, 4, 9])?, &Tensor::new(&[0f32, 5., 9.], &dev)?, 5, 5),
            "seqlens_k is F32",
        ),
        (
            varlen(
                &cu(&[0, 4, 9])?,
                &Tensor::new(&[0i64, 5, 1 << 40], &dev)?,
                5,
                5,
            ),
            "seqlens_k[2] = 1099511627776",
        ),
    ];
    assert_each_names(varlen_cases);
    Ok(())
}
