//! The runtime picks by measurement, honours explicit choices, and explains refusals.

mod common;

use common::{scripted, Scripted};
use flashattn::{
    AttentionSpec, Backend, CacheConfig, DType, Error, KvCache, Opener, Pass, Runtime, Settings,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

/// An autotuned runtime of a "gpu" (1 ms, f16 only) and a "cpu" (5 ms, f32 only).
fn gpu_f16_cpu_f32() -> Runtime {
    Runtime::with_backends(
        vec![
            scripted("gpu", 1.0, &[DType::F16]),
            scripted("cpu", 5.0, &[DType::F32]),
        ],
        true,
    )
}

#[test]
fn only_supporting_backend_is_used_and_refusals_are_explained() {
    let rt = gpu_f16_cpu_f32();
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
    let rt = gpu_f16_cpu_f32();
    let spec = AttentionSpec::new(1, 1, 4, 4, 8);
    assert_eq!(
        rt.select_with(&spec, Pass::Forward, Some("cpu"))
            .unwrap()
            .backend
            .name(),
        "cpu"
    );
    let err = rt
        .select_with(&spec, Pass::Forward, Some("gpu"))
        .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { backend: "gpu", .. }),
        "{err}"
    );
    let err = rt
        .select_with(&spec, Pass::Forward, Some("tpu"))
        .unwrap_err();
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
    let statuses = rt.statuses();
    let cpu = statuses.iter().find(|s| s.name == "cpu").unwrap();
    assert!(cpu.available, "{}", cpu.detail);
    for s in rt.statuses() {
        assert!(!s.detail.is_empty(), "{} has no detail", s.name);
    }
    let spec = AttentionSpec::new(2, 4, 33, 47, 40)
        .heads_kv(2)
        .causal(true)
        .return_lse(true);
    let backend = rt
        .select_with(&spec, Pass::Forward, Some("cpu"))
        .unwrap()
        .backend;
    flashattn::testing::check_backend(backend.as_ref(), &spec, 7).unwrap();
}

fn f32_only(name: &'static str, ms: f64) -> Arc<dyn Backend> {
    scripted(name, ms, &[DType::F32])
}

#[test]
fn a_forced_backend_wins_over_measurement_and_auto_can_be_asked_for() {
    let settings = Settings {
        forced: Some("gpu".into()),
        ..Settings::default()
    };
    let rt = Runtime::with_settings(vec![f32_only("gpu", 9.0), f32_only("cpu", 1.0)], settings);
    let spec = AttentionSpec::new(1, 2, 8, 8, 16);
    for pass_spec in [rt.select(&spec), rt.select_for(&spec, Pass::Forward)] {
        let s = pass_spec.unwrap();
        assert_eq!(s.backend.name(), "gpu");
        assert!(s.reason.contains("FLASHATTN_BACKEND"), "{}", s.reason);
    }
    let s = rt.select_with(&spec, Pass::Forward, Some("auto")).unwrap();
    assert_eq!(s.backend.name(), "cpu", "{}", s.reason);
}

#[test]
fn backends_are_brought_up_only_when_a_selection_needs_them() {
    let opened: Arc<[AtomicUsize; 2]> = Arc::new(Default::default());
    let opener = |i: usize, name: &'static str, ms: f64| -> (&'static str, Opener) {
        let opened = opened.clone();
        let open: Opener = Box::new(move || {
            opened[i].fetch_add(1, Ordering::SeqCst);
            Ok(f32_only(name, ms))
        });
        (name, open)
    };
    let counts = || opened.each_ref().map(|c| c.load(Ordering::SeqCst));
    let rt = Runtime::with_openers(
        vec![opener(0, "gpu", 1.0), opener(1, "cpu", 2.0)],
        Settings::default(),
    );
    assert_eq!(counts(), [0, 0], "nothing is opened up front");
    let spec = AttentionSpec::new(1, 2, 8, 8, 16);
    rt.select_with(&spec, Pass::Forward, Some("cpu")).unwrap();
    assert_eq!(
        counts(),
        [0, 1],
        "an explicit choice opens only that backend"
    );
    assert_eq!(rt.select(&spec).unwrap().backend.name(), "gpu");
    assert_eq!(counts(), [1, 1]);
    assert_eq!(rt.statuses().len(), 2);
    assert_eq!(counts(), [1, 1], "each backend is opened once");
}

#[test]
fn an_unavailable_backend_is_explained() {
    let open: Opener = Box::new(|| {
        Err(Error::Unavailable {
            backend: "gpu",
            reason: "no adapter here".into(),
        })
    });
    let cpu = f32_only("cpu", 1.0);
    let rt = Runtime::with_openers(
        vec![("gpu", open), ("cpu", Box::new(move || Ok(cpu.clone())))],
        Settings::default(),
    );
    let spec = AttentionSpec::new(1, 2, 8, 8, 16);
    let s = rt.select(&spec).unwrap();
    assert_eq!(s.backend.name(), "cpu");
    assert!(
        s.reason.contains("gpu: unavailable (no adapter here)"),
        "{}",
        s.reason
    );
    let err = rt
        .select_with(&spec, Pass::Forward, Some("gpu"))
        .unwrap_err();
    assert!(err.to_string().contains("no adapter here"), "{err}");
    let statuses = rt.statuses();
    assert!(!statuses[0].available && statuses[1].available);
}

fn decode_spec() -> AttentionSpec {
    AttentionSpec::new(2, 4, 1, 1, 16)
        .heads_kv(2)
        .kv_cache(KvCache::contiguous(2, 64, vec![10, 20]).seqlen_new(1))
}

#[test]
fn each_pass_is_filtered_by_its_own_support_and_ranked_by_its_own_timing() {
    let gpu = Scripted::new("gpu", 0.0, &[DType::F32])
        .times(1.0, 9.0, 1.0)
        .arc();
    let cpu = Scripted::new("cpu", 0.0, &[DType::F32])
        .times(5.0, 2.0, 3.0)
        .passes(&[Pass::Forward, Pass::Backward])
        .arc();
    let rt = Runtime::with_backends(vec![gpu, cpu], true);
    let spec = AttentionSpec::new(1, 2, 40, 40, 16).causal(true);
    assert_eq!(
        rt.select_for(&spec, Pass::Forward).unwrap().backend.name(),
        "gpu"
    );
    let s = rt.select_for(&spec, Pass::Backward).unwrap();
    assert_eq!(s.backend.name(), "cpu");
    assert!(s.reason.contains("backward proxy timings"), "{}", s.reason);
    let s = rt.select_for(&decode_spec(), Pass::Decode).unwrap();
    assert_eq!(s.backend.name(), "gpu");
    assert!(s.reason.contains("cpu: no decode pass"), "{}", s.reason);

    let err = rt.select_for(&spec, Pass::Decode).unwrap_err();
    assert!(err.to_string().contains("kv_cache"), "{err}");
    let err = rt.select_for(&decode_spec(), Pass::Forward).unwrap_err();
    assert!(err.to_string().contains("kv_cache"), "{err}");
    // The cache handle comes from the backend selected for decode (here one without handles).
    let err = rt
        .kv_cache(CacheConfig::contiguous(2, 64, 2, 16))
        .err()
        .unwrap();
    assert!(err.to_string().contains("backend gpu"), "{err}");
}

#[test]
fn eight_runtimes_sharing_a_cache_dir_keep_every_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (path, barrier) = (dir.path().to_path_buf(), barrier.clone());
            std::thread::spawn(move || {
                let settings = Settings {
                    cache_dir: Some(path),
                    canary: false,
                    ..Settings::default()
                };
                let rt = Runtime::with_settings(
                    vec![f32_only("gpu", 2.0), f32_only("cpu", 1.0)],
                    settings,
                );
                barrier.wait();
                // Each thread its own bucket (head dim).
                rt.select(&AttentionSpec::new(1, 1, 8, 8, 8 * (i + 1)))
                    .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = std::fs::read_to_string(dir.path().join("autotune.json")).unwrap();
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let buckets = file.as_object().unwrap();
    assert_eq!(buckets.len(), 8, "{text}");
    for row in buckets.values() {
        assert_eq!(row.as_object().unwrap().len(), 2, "{text}");
    }
    common::assert_no_tmp_files(dir.path());
    let settings = Settings {
        cache_dir: Some(dir.path().to_path_buf()),
        ..Settings::default()
    };
    let rt = Runtime::with_settings(vec![f32_only("gpu", 2.0), f32_only("cpu", 1.0)], settings);
    let s = rt.select(&AttentionSpec::new(1, 1, 8, 8, 32)).unwrap();
    assert!(s.reason.contains("cached"), "{}", s.reason);
}

#[test]
fn implausible_cached_timings_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        cache_dir: Some(dir.path().to_path_buf()),
        canary: false,
        ..Settings::default()
    };
    let runtime = || {
        Runtime::with_settings(
            vec![f32_only("gpu", 2.0), f32_only("cpu", 1.0)],
            settings.clone(),
        )
    };
    let spec = AttentionSpec::new(1, 2, 8, 8, 16);
    runtime().select(&spec).unwrap();
    let path = dir.path().join("autotune.json");
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let bad = [
        serde_json::json!(-1.0),
        serde_json::json!(0.0),
        serde_json::json!(1e300),
        serde_json::json!("fast"),
    ];
    for row in file.as_object_mut().unwrap().values_mut() {
        for (i, t) in row.as_object_mut().unwrap().values_mut().enumerate() {
            *t = bad[i % bad.len()].clone();
        }
    }
    std::fs::write(&path, file.to_string()).unwrap();
    let s = runtime().select(&spec).unwrap();
    assert!(s.reason.contains("measured now"), "{}", s.reason);
    assert_eq!(s.backend.name(), "cpu");
}
