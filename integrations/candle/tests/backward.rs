//! Gradients through candle's autograd: flashattn's backward against candle's own backprop of
//! the matmul-softmax-matmul attention, on the same random inputs.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{attention, attention_varlen, rand, rel_err, tolerance, Opts};
use flashattn_candle as fa;

/// Gradients of `sum(out * w)` with respect to q, k, v.
fn grads(q: &Var, k: &Var, v: &Var, out: &Tensor, w: &Tensor) -> Result<[Tensor; 3]> {
    let loss = out.to_dtype(DType::F32)?.mul(w)?.sum_all()?;
    let g = loss.backward()?;
    let get = |x: &Var| {
        g.get(x)
            .cloned()
            .ok_or_else(|| candle_core::Error::msg("no gradient"))
    };
    Ok([get(q)?, get(k)?, get(v)?])
}

fn check_grads(name: &str, dtype: DType, ours: &[Tensor; 3], theirs: &[Tensor; 3]) -> Result<()> {
    // flashattn-core's backward tolerance: twice the forward's.
    let tol = 2.0 * tolerance(dtype);
    for (which, (a, e)) in ["dq", "dk", "dv"].iter().zip(ours.iter().zip(theirs)) {
        assert_eq!(a.dims(), e.dims(), "{name} {which}");
        assert_eq!(a.dtype(), dtype, "{name} {which}");
        let err = rel_err(a, e)?;
        println!("{name} {dtype:?} {which}: rel L2 error {err:.2e}");
        assert!(err < tol, "{name} {dtype:?} {which}: error {err}");
    }
    Ok(())
}

/// q `(b, sq, hq, d)` and so on as fresh variables of `dtype`.
fn vars(shapes: [&[usize]; 3], dtype: DType) -> Result<[Var; 3]> {
    Ok([
        Var::from_tensor(&rand(shapes[0], dtype)?)?,
        Var::from_tensor(&rand(shapes[1], dtype)?)?,
        Var::from_tensor(&rand(shapes[2], dtype)?)?,
    ])
}

#[test]
fn dense_gradients_match_candle_autograd() -> Result<()> {
    let (b, sq, sk, hq, hkv, d) = (2, 33, 47, 6, 2, 40);
    let slopes: Vec<f32> = (0..hq).map(|h| 0.3 / (h + 1) as f32).collect();
    let cases = [
        (
            "causal gqa",
            Opts {
                window: (None, Some(0)),
                ..Opts::default()
            },
        ),
        (
            "window",
            Opts {
                window: (Some(9), Some(4)),
                ..Opts::default()
            },
        ),
        (
            "alibi softcap",
            Opts {
                alibi: Some(slopes.clone()),
                softcap: 4.0,
                ..Opts::default()
            },
        ),
    ];
    for (name, o) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let [q, k, v] = vars([&[b, sq, hq, d], &[b, sk, hkv, d], &[b, sk, hkv, d]], dtype)?;
            let w = rand(&[b, sq, hq, d], DType::F32)?;
            let alibi = o
                .alibi
                .clone()
                .map(|s| Tensor::new(s, &Device::Cpu))
                .transpose()?;
            let out = fa::flash_attn_alibi_windowed_softcap(
                &q,
                &k,
                &v,
                alibi.as_ref(),
                0.2,
                o.window.0,
                o.window.1,
                o.softcap,
            )?;
            let ours = grads(&q, &k, &v, &out, &w)?;
            let (expected, _) = attention(&q, &k, &v, 0.2, &o)?;
            let theirs = grads(&q, &k, &v, &expected, &w)?;
            check_grads(name, dtype, &ours, &theirs)?;
        }
    }
    Ok(())
}

#[test]
fn transposed_view_gradients_match() -> Result<()> {
    // Gradients flow back through candle's transpose to (b, h, s, d) variables.
    let (b, h, s, d) = (1, 3, 29, 72);
    let [q, k, v] = vars([&[b, h, s, d]; 3], DType::F32)?;
    let t = |x: &Var| x.transpose(1, 2);
    let w = rand(&[b, s, h, d], DType::F32)?;
    let out = fa::flash_attn(&t(&q)?, &t(&k)?, &t(&v)?, 0.15, true)?;
    let ours = grads(&q, &k, &v, &out, &w)?;
    let o = Opts {
        window: (None, Some(0)),
        ..Opts::default()
    };
    let (expected, _) = attention(&t(&q)?, &t(&k)?, &t(&v)?, 0.15, &o)?;
    let theirs = grads(&q, &k, &v, &expected, &w)?;
    check_grads("transposed causal", DType::F32, &ours, &theirs)
}

#[test]
fn varlen_gradients_match_candle_autograd() -> Result<()> {
    let (cu_q, cu_k) = ([0u32, 17, 18, 50], [0u32, 5, 45, 77]);
    let (hq, hkv, d) = (4, 2, 40);
    let dev = Device::Cpu;
    let [q, k, v] = vars([&[50, hq, d], &[77, hkv, d], &[77, hkv, d]], DType::F32)?;
    let w = rand(&[50, hq, d], DType::F32)?;
    let (cq, ck) = (Tensor::new(&cu_q, &dev)?, Tensor::new(&cu_k, &dev)?);
    let out = fa::flash_attn_varlen(&q, &k, &v, &cq, &ck, 32, 40, 0.25, true)?;
    let ours = grads(&q, &k, &v, &out, &w)?;
    let o = Opts {
        window: (None, Some(0)),
        ..Opts::default()
    };
    let (expected, _) = attention_varlen(&q, &k, &v, &cu_q, &cu_k, 0.25, &o)?;
    let theirs = grads(&q, &k, &v, &expected, &w)?;
    check_grads("varlen causal", DType::F32, &ours, &theirs)
}
