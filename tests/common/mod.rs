//! A scripted backend for the runtime's tests: it computes with the f64 reference (or gets it
//! wrong on purpose), reports fixed benchmark times per pass, and counts its calls, so that
//! selection, autotune and the canary can be tested without depending on real devices.
#![allow(dead_code)] // each test binary uses part of it

pub mod cli;

use flashattn::{
    reference_attention, reference_backward, reference_decode, AttentionSpec, Backend,
    BackwardInputs, BenchMeasure, BenchRun, DType, DecodeInputs, Error, ForwardInputs, Grads,
    Output, Pass, Result, Tensor, TensorMut,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Scripted {
    pub name: &'static str,
    /// Benchmark time (ms) of the forward, backward and decode passes.
    pub bench_ms: [f64; 3],
    pub dtypes: Vec<DType>,
    pub passes: Vec<Pass>,
    /// Scales every result by this factor (1.0: correct).
    pub error_factor: f32,
    /// Calls of forward, backward and decode.
    pub calls: [AtomicUsize; 3],
}

impl Scripted {
    pub fn new(name: &'static str, bench_ms: f64, dtypes: &[DType]) -> Scripted {
        Scripted {
            name,
            bench_ms: [bench_ms; 3],
            dtypes: dtypes.to_vec(),
            passes: vec![Pass::Forward, Pass::Backward, Pass::Decode],
            error_factor: 1.0,
            calls: Default::default(),
        }
    }

    pub fn wrong(mut self, factor: f32) -> Scripted {
        self.error_factor = factor;
        self
    }

    pub fn times(mut self, forward: f64, backward: f64, decode: f64) -> Scripted {
        self.bench_ms = [forward, backward, decode];
        self
    }

    pub fn passes(mut self, passes: &[Pass]) -> Scripted {
        self.passes = passes.to_vec();
        self
    }

    pub fn arc(self) -> Arc<Scripted> {
        Arc::new(self)
    }

    pub fn calls(&self, pass: Pass) -> usize {
        self.calls[index(pass)].load(Ordering::SeqCst)
    }

    fn refuse(&self, spec: &AttentionSpec, pass: Pass) -> Result<()> {
        if !self.passes.contains(&pass) {
            return Err(Error::unsupported(
                self.name,
                format!("no {} pass", pass.name()),
            ));
        }
        if !self.dtypes.contains(&spec.dtype) {
            return Err(Error::unsupported(
                self.name,
                format!("no {} kernels", spec.dtype),
            ));
        }
        Ok(())
    }

    fn tensor(&self, dtype: DType, values: &[f64]) -> Tensor {
        let v: Vec<f32> = values
            .iter()
            .map(|&x| x as f32 * self.error_factor)
            .collect();
        Tensor::from_f32(dtype, &v)
    }
}

fn index(pass: Pass) -> usize {
    match pass {
        Pass::Forward => 0,
        Pass::Backward => 1,
        Pass::Decode => 2,
    }
}

fn lse(spec: &AttentionSpec, lse: &[f64]) -> Option<Vec<f32>> {
    spec.return_lse
        .then(|| lse.iter().map(|&x| x as f32).collect())
}

/// Writes the f64 `values` into `cache`, rounded to its dtype.
fn write_back(cache: &mut TensorMut<'_>, values: &[f64]) {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    cache.write_f32(0, &v);
}

impl Backend for Scripted {
    fn name(&self) -> &'static str {
        self.name
    }
    fn device(&self) -> String {
        format!("scripted {}", self.name)
    }
    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.refuse(spec, Pass::Forward)
    }
    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        self.refuse(spec, Pass::Backward)
    }
    fn supports_decode(&self, spec: &AttentionSpec) -> Result<()> {
        self.refuse(spec, Pass::Decode)
    }
    fn forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output> {
        let ForwardInputs { q, k, v } = inputs;
        self.calls[0].fetch_add(1, Ordering::SeqCst);
        let r = reference_attention(spec, q, k, v)?;
        Ok(Output {
            out: self.tensor(spec.dtype.output(), &r.out),
            lse: lse(spec, &r.lse),
        })
    }
    fn backward(&self, spec: &AttentionSpec, t: BackwardInputs<'_>) -> Result<Grads> {
        self.calls[1].fetch_add(1, Ordering::SeqCst);
        let g = reference_backward(spec, t.q, t.k, t.v, t.dout)?;
        Ok(Grads {
            dq: Tensor::from_f32(
                spec.dtype,
                &g.dq.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            ),
            dk: Tensor::from_f32(
                spec.dtype,
                &g.dk.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            ),
            dv: self.tensor(spec.dtype, &g.dv),
        })
    }
    fn decode(&self, spec: &AttentionSpec, mut t: DecodeInputs<'_>) -> Result<Output> {
        self.calls[2].fetch_add(1, Ordering::SeqCst);
        let r = reference_decode(
            spec,
            t.q,
            t.k_cache.as_ref(),
            t.v_cache.as_ref(),
            t.k_new,
            t.v_new,
        )?;
        write_back(&mut t.k_cache, &r.k_cache);
        write_back(&mut t.v_cache, &r.v_cache);
        Ok(Output {
            out: self.tensor(spec.dtype.output(), &r.out),
            lse: lse(spec, &r.lse),
        })
    }
    fn bench(&self, run: BenchRun<'_>) -> Result<BenchMeasure> {
        let BenchRun { plan, progress, .. } = run;
        for _ in 0..plan.runs()? {
            progress();
        }
        Ok(BenchMeasure {
            times_ms: vec![self.bench_ms[index(plan.pass)]; plan.iters],
            extra_bytes: Some(0),
        })
    }
}

/// A scripted backend as the runtime holds it.
pub fn scripted(name: &'static str, bench_ms: f64, dtypes: &[DType]) -> Arc<dyn Backend> {
    Scripted::new(name, bench_ms, dtypes).arc()
}

/// No half-written `*.tmp` file is left in `dir` (outputs are written to a temporary and renamed).
pub fn assert_no_tmp_files(dir: &std::path::Path) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
