//! The canary: a kernel variant that gives wrong results on its small problem is caught,
//! logged, recorded and skipped; a correct one is checked once per variant, and the verdict
//! survives into a new runtime on the same cache directory.

mod common;

use common::{scripted, Scripted};
use flashattn::{AttentionSpec, Backend, DType, KvCache, Pass, Runtime, Settings};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Every log line of this test binary.
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = format!("{} {}", record.level(), record.args());
        LOGS.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static LOGGER: Capture = Capture;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

fn settings(dir: &Path) -> Settings {
    Settings {
        cache_dir: Some(dir.to_path_buf()),
        autotune: false,
        ..Settings::default()
    }
}

fn recorded(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("canary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_wrong_kernel_is_caught_logged_recorded_and_skipped() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let gpu = Scripted::new("gpu", 1.0, &[DType::F32, DType::Bf16])
        .wrong(1.01)
        .arc();
    let cpu = scripted("cpu", 5.0, &[DType::F32, DType::Bf16]);
    let rt = Runtime::with_settings(vec![gpu.clone(), cpu.clone()], settings(dir.path()));
    // bf16's tolerance (2e-2) lets a 1% error through: the canary must catch f32's.
    let spec = AttentionSpec::new(2, 8, 300, 1000, 64)
        .heads_kv(2)
        .causal(true);
    let s = rt.select(&spec).unwrap();
    assert_eq!(s.backend.name(), "cpu", "{}", s.reason);
    assert!(s.reason.contains("gpu: failed its canary"), "{}", s.reason);
    assert_eq!(gpu.calls(Pass::Forward), 1);

    let record = &recorded(dir.path())["scripted gpu"]["gpu/forward/f32"];
    assert_eq!(record["status"], "broken", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("relative L2 error"),
        "{record}"
    );
    let logs = LOGS.lock().unwrap().join("\n");
    assert!(
        logs.contains("WARN flashattn: canary of gpu/forward/f32 on scripted gpu FAILED"),
        "{logs}"
    );

    // Later problems of the same variant skip it without running it again.
    rt.select(&AttentionSpec::new(1, 4, 64, 64, 32)).unwrap();
    assert_eq!(gpu.calls(Pass::Forward), 1);
    // Asked for by name, it is an error that says why, not a wrong answer.
    let err = rt
        .select_with(&spec, Pass::Forward, Some("gpu"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("failed its canary") && err.contains("FLASHATTN_CANARY=0"),
        "{err}"
    );
    // A new runtime on the same cache directory trusts the record.
    let gpu2 = Scripted::new("gpu", 1.0, &[DType::F32]).arc();
    let rt = Runtime::with_settings(vec![gpu2.clone(), cpu], settings(dir.path()));
    assert_eq!(rt.select(&spec).unwrap().backend.name(), "cpu");
    assert_eq!(gpu2.calls(Pass::Forward), 0);
}

#[test]
fn a_correct_kernel_is_checked_once_per_variant_and_the_record_survives() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = Scripted::new("gpu", 1.0, &[DType::F32, DType::F16]).arc();
    let rt = Runtime::with_settings(vec![gpu.clone()], settings(dir.path()));
    for seqlen in [17, 129, 1000] {
        let spec = AttentionSpec::new(1, 2, seqlen, seqlen, 40);
        assert_eq!(rt.select(&spec).unwrap().backend.name(), "gpu");
    }
    assert_eq!(gpu.calls(Pass::Forward), 1, "one variant, one canary");
    rt.select(&AttentionSpec::new(1, 2, 9, 9, 40).dtype(DType::F16))
        .unwrap();
    assert_eq!(gpu.calls(Pass::Forward), 2, "f16 is another variant");
    let records = recorded(dir.path());
    for variant in ["gpu/forward/f32", "gpu/forward/f16"] {
        assert_eq!(records["scripted gpu"][variant]["status"], "passed");
    }
    let again = Scripted::new("gpu", 1.0, &[DType::F32]).arc();
    let rt = Runtime::with_settings(vec![again.clone()], settings(dir.path()));
    rt.select(&AttentionSpec::new(1, 2, 9, 9, 40)).unwrap();
    assert_eq!(again.calls(Pass::Forward), 0, "the record was trusted");
}

#[test]
fn concurrent_first_uses_run_one_canary() {
    let gpu = Scripted::new("gpu", 1.0, &[DType::F32]).arc();
    let rt = Arc::new(Runtime::with_backends(vec![gpu.clone()], false));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let rt = rt.clone();
            std::thread::spawn(move || {
                rt.select(&AttentionSpec::new(1, 2, 33, 33, 16)).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(gpu.calls(Pass::Forward), 1);
}

#[test]
fn backward_and_decode_kernels_are_checked_too() {
    let gpu = Scripted::new("gpu", 1.0, &[DType::F32]).wrong(1.05).arc();
    let cpu = scripted("cpu", 5.0, &[DType::F32]);
    let rt = Runtime::with_backends(vec![gpu.clone(), cpu], false);
    let spec = AttentionSpec::new(2, 4, 50, 70, 32).softcap(10.0);
    let s = rt.select_for(&spec, Pass::Backward).unwrap();
    assert_eq!(s.backend.name(), "cpu", "{}", s.reason);
    assert!(s.reason.contains("dv relative L2"), "{}", s.reason);
    assert_eq!(gpu.calls(Pass::Backward), 1);

    let paged = AttentionSpec::new(3, 8, 1, 1, 64)
        .heads_kv(2)
        .causal(true)
        .kv_cache(
            KvCache::paged(40, 16, (0..30).collect(), 10, vec![100, 0, 150])
                .seqlen_new(1)
                .rotary(flashattn::rotary_tables(32, 200, false)),
        );
    let s = rt.select_for(&paged, Pass::Decode).unwrap();
    assert_eq!(s.backend.name(), "cpu", "{}", s.reason);
    assert_eq!(gpu.calls(Pass::Decode), 1);
}

#[test]
fn small_problems_keep_the_kind_of_every_feature() {
    // A correct scripted backend passes the canary on each kind: the small problem is valid
    // and runs (varlen, ALiBi per batch, window, GQA, contiguous cache with batch_idx, MQA).
    let gpu = Scripted::new("gpu", 1.0, &DType::ALL).arc();
    let rt = Runtime::with_backends(vec![gpu.clone() as Arc<dyn Backend>], false);
    let specs = [
        AttentionSpec::new(1, 6, 45, 70, 72)
            .heads_kv(3)
            .varlen(vec![0, 1, 18, 45], vec![0, 30, 30, 70])
            .causal(true),
        AttentionSpec::new(3, 4, 500, 900, 40)
            .window(300, 2)
            .alibi(vec![0.1; 12], true)
            .dtype(DType::Bf16),
        AttentionSpec::new(2, 4, 20, 20, 24)
            .head_dim_v(16)
            .dtype(DType::F16),
    ];
    for (i, spec) in specs.iter().enumerate() {
        let s = rt.select(spec).unwrap();
        assert_eq!(s.backend.name(), "gpu", "{}", s.reason);
        assert_eq!(gpu.calls(Pass::Forward), i + 1);
    }
    let cached = AttentionSpec::new(3, 8, 1, 1, 64).heads_kv(1).kv_cache(
        KvCache::contiguous(4, 300, vec![0, 17, 250])
            .batch_idx(vec![3, 1, 0])
            .seqlen_new(2),
    );
    assert_eq!(
        rt.select_for(&cached, Pass::Decode).unwrap().backend.name(),
        "gpu"
    );
    assert_eq!(gpu.calls(Pass::Decode), 1);
}

#[test]
fn the_canary_can_be_turned_off() {
    let gpu = Scripted::new("gpu", 1.0, &[DType::F32]).wrong(2.0).arc();
    let settings = Settings {
        canary: false,
        autotune: false,
        ..Settings::default()
    };
    let rt = Runtime::with_settings(
        vec![gpu.clone(), scripted("cpu", 1.0, &[DType::F32])],
        settings,
    );
    let s = rt.select(&AttentionSpec::new(1, 2, 9, 9, 16)).unwrap();
    assert_eq!(s.backend.name(), "gpu");
    assert_eq!(gpu.calls(Pass::Forward), 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(100))]

    /// Every kind of problem the shared strategy draws gets a valid small problem of its
    /// kind, which a correct backend passes (forward and backward).
    #[test]
    fn a_correct_backend_passes_the_canary_of_every_kind_of_problem(
        spec in flashattn::testing::strategy::specs(
            flashattn::testing::strategy::SpecSpace::new(&[DType::F32, DType::F16, DType::Bf16]),
        ),
        backward in proptest::prelude::any::<bool>(),
    ) {
        let gpu = Scripted::new("gpu", 1.0, &DType::ALL).arc();
        let rt = Runtime::with_backends(vec![gpu.clone()], false);
        let pass = if backward { Pass::Backward } else { Pass::Forward };
        let s = rt.select_for(&spec, pass);
        proptest::prop_assert!(s.is_ok(), "{spec}: {:?}", s.err());
        proptest::prop_assert_eq!(gpu.calls(pass), 1);
    }
}
