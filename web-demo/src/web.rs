//! The wasm-bindgen API the page calls: `Demo.create()` opens the WebGPU adapter,
//! `demo.adapter()` describes it, `demo.run(config)` runs one problem and reports.

use crate::config::{CheckMode, DemoConfig};
use crate::gradients::{check_gradients, random_dout, GradientCheck, REFERENCE_MAX_BACKWARD_FLOPS};
use crate::heatmap::attention_heatmap;
use crate::report::{
    check_against_reference, median_ms, tflops, CheckResult, MemoryReport, REFERENCE_MAX_FLOPS,
};
use flashattn_core::{
    random_inputs, Algorithm, AttentionSpec, BackwardInputs, BenchPlan, CheckedSpec, DType, Error,
    ForwardInputs, Output, Pass, Tensor,
};
use flashattn_wgpu::{BenchOptions, WgpuBackend};
use serde::Serialize;
use std::rc::Rc;
use wasm_bindgen::prelude::*;

/// Side of the heatmap in cells: enough to see the patterns, cheap to rebuild in the page.
const HEATMAP_SIDE: usize = 256;

fn js_err(e: impl std::fmt::Display) -> JsValue {
    JsValue::from_str(&e.to_string())
}

fn to_js<T: Serialize>(value: &T) -> Result<JsValue, JsValue> {
    // Maps become plain objects so the page can read fields directly.
    let ser = serde_wasm_bindgen::Serializer::new().serialize_maps_as_objects(true);
    value.serialize(&ser).map_err(js_err)
}

fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map(|p| p.now())
        .unwrap_or_else(js_sys::Date::now)
}

#[derive(Serialize)]
struct AdapterReport {
    description: String,
    name: String,
    vendor: u32,
    device: u32,
    device_type: String,
    backend: String,
    driver: String,
    driver_info: String,
    /// Input dtypes this adapter runs ("f16" only with SHADER_F16).
    dtypes: Vec<&'static str>,
    shader_f16: bool,
    timestamps: bool,
    subgroup_size: u32,
}

#[derive(Serialize)]
struct Timing {
    /// "device timestamps" or "host clock (submit to done)".
    timer: &'static str,
    iters: usize,
    flash_ms: Option<f64>,
    flash_tflops: Option<f64>,
    naive_ms: Option<f64>,
    naive_tflops: Option<f64>,
    /// Why naive attention was not timed, if it was not.
    naive_error: Option<String>,
    /// Upload + first forward + readback of the checked run, on the host clock.
    first_forward_ms: f64,
}

#[derive(Serialize)]
struct HeatmapReport {
    head: usize,
    rows: usize,
    cols: usize,
    masked_cells: usize,
    row_sum_max_err: f64,
    first_row: usize,
    last_row: usize,
    /// Row-major mean weights, NaN where masked.
    values: Vec<f32>,
}

#[derive(Serialize)]
struct RunReport {
    spec: String,
    seqlen: usize,
    heads: usize,
    head_dim: usize,
    dtype: &'static str,
    flops: f64,
    visible_pairs: u64,
    timing: Timing,
    memory: MemoryReport,
    check: CheckResult,
    /// dq, dk, dv of the backward pass against the reference backward.
    gradients: GradientCheck,
    heatmap: HeatmapReport,
}

/// The page's handle on the WebGPU backend.
#[wasm_bindgen]
pub struct Demo {
    backend: Rc<WgpuBackend>,
}

#[wasm_bindgen]
impl Demo {
    /// Opens the best WebGPU adapter; rejects with the reason when there is none.
    pub async fn create() -> Result<Demo, JsValue> {
        let backend = WgpuBackend::new_async().await.map_err(js_err)?;
        Ok(Demo {
            backend: Rc::new(backend),
        })
    }

    /// The adapter and what it offers.
    pub fn adapter(&self) -> Result<JsValue, JsValue> {
        let b = &self.backend;
        let info = b.adapter_info();
        let mut dtypes = vec!["f32"];
        if b.has_f16() {
            dtypes.push("f16");
        }
        let bf16 = AttentionSpec::new(1, 1, 1, 1, 8).dtype(DType::Bf16);
        if b.check_supported(&bf16).is_ok() {
            dtypes.push("bf16");
        }
        to_js(&AdapterReport {
            description: b.device_description(),
            name: info.name.clone(),
            vendor: info.vendor,
            device: info.device,
            device_type: format!("{:?}", info.device_type),
            backend: format!("{:?}", info.backend),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            dtypes,
            shader_f16: b.has_f16(),
            timestamps: b.has_timestamps(),
            subgroup_size: b.subgroup_size(),
        })
    }

    /// Runs the problem the form describes (a plain object with `DemoConfig`'s fields):
    /// forward pass, check against the reference, heatmap, then timings of flash and naive.
    pub fn run(&self, config: JsValue) -> js_sys::Promise {
        let backend = Rc::clone(&self.backend);
        wasm_bindgen_futures::future_to_promise(async move {
            let cfg: DemoConfig = serde_wasm_bindgen::from_value(config)
                .map_err(|e| js_err(format!("bad form: {e}")))?;
            let report = run(&backend, &cfg).await.map_err(js_err)?;
            to_js(&report)
        })
    }
}

async fn run(backend: &WgpuBackend, cfg: &DemoConfig) -> Result<RunReport, Error> {
    let spec = cfg.to_spec()?;
    backend.check_supported(&spec)?;
    let (q, k, v) = random_inputs(&spec, cfg.seed);

    let t0 = now_ms();
    let out = backend
        .forward_async(&spec, ForwardInputs::of(&q, &k, &v))
        .await?;
    let first_forward_ms = now_ms() - t0;

    let check = match cfg.check {
        CheckMode::Never => CheckResult::skipped(&spec, "turned off"),
        CheckMode::Auto if spec.flops() > REFERENCE_MAX_FLOPS => CheckResult::skipped(
            &spec,
            format!(
                "{:.2} GFLOP is too much for the f64 reference in the page (limit {:.2}); \
                 choose 'always' to run it anyway",
                spec.flops() / 1e9,
                REFERENCE_MAX_FLOPS / 1e9
            ),
        ),
        _ => check_against_reference(&spec, q.as_ref(), k.as_ref(), v.as_ref(), &out, &now_ms),
    };

    let lse = out
        .lse
        .as_deref()
        .ok_or_else(|| Error::backend("wgpu", "the kernel returned no LSE"))?;
    let checked = spec.validate()?;
    let gradients = gradient_check(backend, cfg, &checked, (&q, &k, &v), &out, lse).await?;
    let map = attention_heatmap(
        &spec,
        q.as_ref(),
        k.as_ref(),
        lse,
        cfg.heatmap_head,
        HEATMAP_SIDE,
    )?;
    drop((q, k, v, out));

    let (timing, memory) = timings(backend, &checked, cfg, first_forward_ms).await?;

    Ok(RunReport {
        spec: spec.shape_string(),
        seqlen: cfg.seqlen,
        heads: cfg.heads,
        head_dim: cfg.head_dim,
        dtype: spec.dtype.name(),
        flops: spec.flops(),
        visible_pairs: u64::try_from(spec.visible_pairs()).unwrap_or(u64::MAX),
        timing,
        memory,
        check,
        gradients,
        heatmap: HeatmapReport {
            head: map.head,
            rows: map.rows,
            cols: map.cols,
            masked_cells: map.masked_cells,
            row_sum_max_err: map.row_sum_max_err,
            first_row: map.query_rows.first().copied().unwrap_or(0),
            last_row: map.query_rows.last().copied().unwrap_or(0),
            values: map.values,
        },
    })
}

/// Runs the backward pass on the page's problem (the forward's out and LSE, a seeded dout) and
/// checks dq, dk, dv against the reference backward, unless the form turns it off or the
/// reference would be too slow for `CheckMode::Auto`.
async fn gradient_check(
    backend: &WgpuBackend,
    cfg: &DemoConfig,
    c: &CheckedSpec<'_>,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Output,
    lse: &[f32],
) -> Result<GradientCheck, Error> {
    let spec = c.spec;
    if !cfg.gradients || cfg.check == CheckMode::Never {
        return Ok(GradientCheck::skipped(spec, "turned off"));
    }
    if cfg.check == CheckMode::Auto && spec.backward_flops() > REFERENCE_MAX_BACKWARD_FLOPS {
        return Ok(GradientCheck::skipped(
            spec,
            format!(
                "{:.2} GFLOP of backward is too much for the f64 reference in the page (limit {:.2}); \
                 choose 'always' to run it anyway",
                spec.backward_flops() / 1e9,
                REFERENCE_MAX_BACKWARD_FLOPS / 1e9
            ),
        ));
    }
    let dout = random_dout(c, cfg.seed);
    let t0 = now_ms();
    let inputs = BackwardInputs {
        q: q.as_ref(),
        k: k.as_ref(),
        v: v.as_ref(),
        out: out.out.as_ref(),
        lse,
        dout: dout.as_ref(),
    };
    let grads = backend.backward_async(spec, inputs).await?;
    let backward_ms = now_ms() - t0;
    let qkv = (q.as_ref(), k.as_ref(), v.as_ref());
    let mut check = check_gradients(spec, qkv, dout.as_ref(), &grads, &now_ms);
    check.backward_ms = Some(backward_ms);
    Ok(check)
}

/// Times flash and (unless turned off) naive attention on the device, with their measured
/// extra memory.
async fn timings(
    backend: &WgpuBackend,
    c: &CheckedSpec<'_>,
    cfg: &DemoConfig,
    first_forward_ms: f64,
) -> Result<(Timing, MemoryReport), Error> {
    let spec = c.spec;
    let plan = BenchPlan {
        warmup: 1,
        iters: cfg.iters,
        seed: cfg.seed,
        pass: Pass::Forward,
    };
    let flash = backend
        .bench_async(spec, Algorithm::Flash, &plan, &mut || {})
        .await?;
    let flash_ms = median_ms(&flash.times_ms);
    let mut memory = MemoryReport::new(c);
    memory.flash_extra_bytes = flash.extra_bytes;
    let (naive_ms, naive_error) = if cfg.naive {
        match backend
            .bench_async(spec, Algorithm::Naive, &plan, &mut || {})
            .await
        {
            Ok(m) => {
                memory.naive_extra_bytes = m.extra_bytes;
                (median_ms(&m.times_ms), None)
            }
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, Some("turned off".into()))
    };
    let timing = Timing {
        timer: match backend.bench_timing() {
            BenchOptions::DeviceTimer => "device timestamps",
            BenchOptions::HostTimer => "host clock (submit to done)",
        },
        iters: cfg.iters,
        flash_ms,
        flash_tflops: flash_ms.map(|ms| tflops(spec, ms)),
        naive_ms,
        naive_tflops: naive_ms.map(|ms| tflops(spec, ms)),
        naive_error,
        first_forward_ms,
    };
    Ok((timing, memory))
}
