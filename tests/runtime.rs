//! The runtime picks by measurement, honours explicit choices, and explains refusals.

use flashattn::{
    reference_attention, Algorithm, AttentionSpec, Backend, BenchMeasure, BenchPlan, DType, Error,
    Output, Result, Runtime, Tensor, TensorRef,
};
use std::sync::Arc;

/// A backend that computes with the reference and reports a fixed benchmark time, so the
/// selection logic can be tested without depending on which real device is faster.
struct Scripted {
    name: &'static str,
    bench_ms: f64,
    dtypes: Vec<DType>,
}

impl Backend for Scripted {
    fn name(&self) -> &'static str {
        self.name
    }
    fn device(&self) -> String {
        format!("scripted {}", self.name)
    }
    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        if self.dtypes.contains(&spec.dtype) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: self.name,
                reason: format!("no {} kernels", spec.dtype),
            })
        }
    }
    fn forward(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        let r = reference_attention(spec, q, k, v)?;
        let out: Vec<f32> = r.out.iter().map(|&x| x as f32).collect();
        Ok(Output {
            out: Tensor::from_f32(spec.dtype.output(), &out),
            lse: spec
                .return_lse
                .then(|| r.lse.iter().map(|&x| x as f32).collect()),
        })
    }
    fn bench(
        &self,
        _: &AttentionSpec,
        _: Algorithm,
        plan: &BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<BenchMeasure> {
        for _ in 0..plan.warmup + plan.iters {
            progress();
        }
        Ok(BenchMeasure {
            times_ms: vec![self.bench_ms; plan.iters],
            extra_bytes: Some(0),
        })
    }
}

fn scripted(name: &'static str, bench_ms: f64, dtypes: &[DType]) -> Arc<dyn Backend> {
    Arc::new(Scripted {
        name,
        bench_ms,
        dtypes: dtypes.to_vec(),
    })
}

#[test]
fn picks_the_faster_backend_by_measurement_not_priority() {
    let all = [DType::F32, DType::F16];
    // "gpu" has the higher static priority but measures slower (a software adapter, say).
    let rt = Runtime::with_backends(
        vec![scripted("gpu", 9.0, &all), scripted("cpu", 2.0, &all)],
        true,
    );
    let spec = AttentionSpec::new(1, 2, 8, 8, 16);
    let s = rt.select(&spec).unwrap();
    assert_eq!(s.backend.name(), "cpu");
    assert!(s.reason.contains("measured now"), "{}", s.reason);
    // The second time the cached measurement decides.
    let s = rt.select(&spec).unwrap();
    assert_eq!(s.backend.name(), "cpu");
    assert!(s.reason.contains("cached"), "{}", s.reason);
}

#[test]
fn static_priority_when_autotune_is_off() {
    let all = [DType::F32];
    let rt = Runtime::with_backends(
        vec![scripted("gpu", 9.0, &all), scripted("cpu", 2.0, &all)],
        false,
    );
    let s = rt.select(&AttentionSpec::new(1, 1, 4, 4, 8)).unwrap();
    assert_eq!(s.backend.name(), "gpu");
}

#[test]
fn only_supporting_backend_is_used_and_refusals_are_explained() {
    let rt = Runtime::with_backends(
        vec![
            scripted("gpu", 1.0, &[DType::F16]),
            scripted("cpu", 5.0, &[DType::F32]),
        ],
        true,
    );
    let s = rt.select(&AttentionSpec::new(1, 1, 4, 4, 8)).unwrap();
    assert_eq!(s.backend.name(), "cpu");
    assert!(s.reason.contains("gpu: no f32 kernels"), "{}", s.reason);
    let err = rt
        .select(&AttentionSpec::new(1, 1, 4, 4, 8).dtype(DType::Bf16))
        .unwrap_err();
    assert!(err.to_string().contains("no bf16 kernels"), "{err}");
}

#[test]
fn explicit_choice_is_honoured_or_refused_with_reason() {
    let rt = Runtime::with_backends(
        vec![
            scripted("gpu", 1.0, &[DType::F16]),
            scripted("cpu", 5.0, &[DType::F32]),
        ],
        true,
    );
    let spec = AttentionSpec::new(1, 1, 4, 4, 8);
    assert_eq!(
        rt.select_with(&spec, Some("cpu")).unwrap().backend.name(),
        "cpu"
    );
    let err = rt.select_with(&spec, Some("gpu")).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { backend: "gpu", .. }),
        "{err}"
    );
    let err = rt.select_with(&spec, Some("tpu")).unwrap_err();
    assert!(err.to_string().contains("unknown backend"), "{err}");
}

#[test]
fn invalid_specs_fail_before_selection() {
    let rt = Runtime::with_backends(vec![scripted("cpu", 1.0, &[DType::F32])], true);
    let err = rt
        .select(&AttentionSpec::new(1, 3, 4, 4, 8).heads_kv(2))
        .unwrap_err();
    assert!(err.to_string().contains("heads_kv"), "{err}");
}

#[test]
fn the_real_runtime_always_has_the_cpu_backend_and_computes_correctly() {
    let rt = Runtime::new();
    let cpu = rt.statuses().iter().find(|s| s.name == "cpu").unwrap();
    assert!(cpu.available, "{}", cpu.detail);
    for s in rt.statuses() {
        assert!(!s.detail.is_empty(), "{} has no detail", s.name);
    }
    let spec = AttentionSpec::new(2, 4, 33, 47, 40)
        .heads_kv(2)
        .causal(true)
        .return_lse(true);
    let backend = rt.select_with(&spec, Some("cpu")).unwrap().backend;
    flashattn::testing::check_backend(backend.as_ref(), &spec, 7).unwrap();
}
