//! `FlashMha` (a llama-style attention block built with candle-nn) against the same block
//! written with candle ops: same output, same gradients through candle's backprop.

mod common;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{linear_b, VarBuilder, VarMap};
use common::{attention, rand, rel_err, Opts};
use flashattn_candle::{FlashMha, FlashMhaConfig};

/// The block with candle ops only: the same weights, candle-nn's `rope_slow` on (b, h, s, d),
/// matmul-softmax-matmul attention.
fn reference_block(
    c: &FlashMhaConfig,
    vb: VarBuilder,
    x: &Tensor,
    offset: usize,
) -> Result<Tensor> {
    let (b, s, hidden) = x.dims3()?;
    let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let proj = |name: &str, inp: usize, out: usize| linear_b(inp, out, c.bias, vb.pp(name));
    let heads = |t: Tensor, h: usize| t.reshape((b, s, h, d))?.transpose(1, 2)?.contiguous();
    let mut q = heads(proj("q_proj", hidden, hq * d)?.forward(x)?, hq)?;
    let mut k = heads(proj("k_proj", hidden, hkv * d)?.forward(x)?, hkv)?;
    let v = heads(proj("v_proj", hidden, hkv * d)?.forward(x)?, hkv)?;
    if let Some(base) = c.rotary_base {
        let angles: Vec<f32> = (offset..offset + s)
            .flat_map(|p| (0..d / 2).map(move |i| p as f32 / base.powf(2.0 * i as f32 / d as f32)))
            .collect();
        let angles = Tensor::from_vec(angles, (s, d / 2), x.device())?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        q = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?;
        k = candle_nn::rotary_emb::rope_slow(&k, &cos, &sin)?;
    }
    let o = Opts {
        window: (None, c.causal.then_some(0)),
        ..Opts::default()
    };
    let t = |x: &Tensor| x.transpose(1, 2);
    let (out, _) = attention(&t(&q)?, &t(&k)?, &t(&v)?, 1.0 / (d as f32).sqrt(), &o)?;
    proj("o_proj", hq * d, hidden)?.forward(&out.reshape((b, s, hq * d))?)
}

fn config(causal: bool, rotary: bool) -> FlashMhaConfig {
    FlashMhaConfig {
        hidden_size: 64,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 24,
        causal,
        rotary_base: rotary.then_some(10000.0),
        bias: true,
    }
}

#[test]
fn flash_mha_matches_candle_ops_block_with_gradients() -> Result<()> {
    for (causal, rotary, offset) in [(true, true, 0), (true, true, 5), (false, false, 0)] {
        let c = config(causal, rotary);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let layer = FlashMha::new(c.clone(), vb.pp("attn"))?;
        let x = Var::from_tensor(&rand(&[2, 37, c.hidden_size], DType::F32)?)?;
        let w = rand(&[2, 37, c.hidden_size], DType::F32)?;
        let ours = layer.forward_at(&x, offset)?;
        let theirs = reference_block(&c, vb.pp("attn"), &x, offset)?;
        let err = rel_err(&ours, &theirs)?;
        println!("causal={causal} rotary={rotary} offset={offset}: output error {err:.2e}");
        assert!(err < 1e-4, "output error {err}");

        let g_ours = ours.mul(&w)?.sum_all()?.backward()?;
        let g_theirs = theirs.mul(&w)?.sum_all()?.backward()?;
        let mut params = varmap.all_vars();
        assert_eq!(params.len(), 8, "four projections with biases");
        params.push(x.clone());
        for p in &params {
            let (a, e) = (g_ours.get(p), g_theirs.get(p));
            let (Some(a), Some(e)) = (a, e) else {
                panic!("missing gradient for a parameter of shape {:?}", p.shape());
            };
            let norm = |t: &Tensor| t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>();
            if norm(e)? < 1e-3 {
                // Without rotary, k_proj's bias shifts each row's scores by a constant: its
                // exact gradient is 0 and both sides hold rounding noise only.
                assert!(
                    norm(a)? < 1e-3,
                    "gradient of {:?}: norm {}",
                    p.shape(),
                    norm(a)?
                );
                continue;
            }
            let err = rel_err(a, e)?;
            assert!(err < 2e-4, "gradient of {:?}: error {err}", p.shape());
        }
    }
    Ok(())
}

#[test]
fn flash_mha_loads_named_weights_and_runs_bf16() -> Result<()> {
    // Weights from a plain tensor map, as from safetensors; bf16 within bf16 tolerance.
    let c = config(true, true);
    let dev = Device::Cpu;
    let (h, q_out, kv_out) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    );
    let mut ts = std::collections::HashMap::new();
    for (name, out, inp) in [
        ("q_proj", q_out, h),
        ("k_proj", kv_out, h),
        ("v_proj", kv_out, h),
        ("o_proj", h, q_out),
    ] {
        ts.insert(
            format!("{name}.weight"),
            (rand(&[out, inp], DType::F32)? * 0.2)?,
        );
        ts.insert(format!("{name}.bias"), rand(&[out], DType::F32)?);
    }
    let vb32 = VarBuilder::from_tensors(ts.clone(), DType::F32, &dev);
    let vb16 = VarBuilder::from_tensors(ts, DType::BF16, &dev);
    let x = rand(&[1, 50, h], DType::F32)?;
    let ours = FlashMha::new(c.clone(), vb16)?.forward(&x.to_dtype(DType::BF16)?)?;
    assert_eq!(ours.dtype(), DType::BF16);
    let theirs = reference_block(&c, vb32, &x, 0)?;
    let err = rel_err(&ours, &theirs)?;
    assert!(err < 3e-2, "bf16 layer error {err}");
    // A missing weight is candle's own error, naming it.
    let empty = VarBuilder::from_tensors(Default::default(), DType::F32, &dev);
    let msg = FlashMha::new(c, empty)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("q_proj"), "{msg}");
    Ok(())
}

#[test]
fn flash_mha_rejects_bad_configs() {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let mut c = config(true, true);
    c.num_kv_heads = 3;
    let msg = FlashMha::new(c, vb.clone()).err().map(|e| e.to_string());
    assert!(msg.is_some_and(|m| m.contains("num_kv_heads = 3")));
    let mut c = config(true, true);
    c.head_dim = 25;
    let msg = FlashMha::new(c, vb).err().map(|e| e.to_string());
    assert!(msg.is_some_and(|m| m.contains("head_dim = 25")));
}
