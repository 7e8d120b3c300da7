//! What the wgpu test binaries share beyond `flashattn_core::testing`: one backend per test
//! binary (opening a device is slow), skipped with a printed reason when there is no adapter,
//! the dtypes the adapter runs, and the benchmark's memory check.
#![allow(dead_code)] // not every test binary uses every helper

use flashattn_core::testing::{backend_or_skip, check_cases, CheckReport};
use flashattn_core::{Algorithm, AttentionSpec, Backend, BenchPlan, BenchRun, DType, Pass};
use flashattn_wgpu::{wgpu, WgpuBackend};
use std::sync::OnceLock;

/// The backend, or `None` when the test is skipped (the reason is printed; a failure instead
/// when FLASHATTN_REQUIRE_BACKENDS names wgpu).
pub fn backend() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let b = B
        .get_or_init(|| {
            let b = backend_or_skip("wgpu", WgpuBackend::new)?;
            eprintln!("wgpu tests on {}", b.device_description());
            Some(b)
        })
        .as_ref();
    if b.is_none() {
        eprintln!(
            "SKIP: no wgpu adapter (scripts/install-lavapipe.sh installs a CPU Vulkan driver)"
        );
    }
    b
}

/// A second backend on its own device that uses the workgroup-memory reduction instead of
/// subgroups; `None` when the test is skipped (no adapter).
pub fn backend_without_subgroups() -> Option<WgpuBackend> {
    backend()?;
    let b = WgpuBackend::new().expect("second device");
    Some(b.without_subgroups())
}

/// A second backend whose storage bindings hold at most `bytes` (to drive the chunking paths);
/// `None` when the test is skipped (no adapter).
pub fn backend_with_binding_limit(bytes: u64) -> Option<WgpuBackend> {
    backend()?;
    let b = WgpuBackend::new().expect("second device");
    Some(b.with_max_binding_bytes(bytes))
}

/// The input dtypes `b` runs: f32, bf16, and f16 where the adapter has SHADER_F16.
pub fn dtypes(b: &WgpuBackend) -> Vec<DType> {
    if b.has_f16() {
        vec![DType::F32, DType::Bf16, DType::F16]
    } else {
        eprintln!(
            "SKIP f16: adapter {} has no SHADER_F16",
            b.adapter_info().name
        );
        vec![DType::F32, DType::Bf16]
    }
}

/// Runs every case through `check` (core's `check_backend` or `check_backward`; seeds from
/// `seed`); panics listing all failures.
pub fn assert_cases<S: AsRef<str>>(
    b: &WgpuBackend,
    cases: &[(S, AttentionSpec)],
    seed: u64,
    check: fn(&dyn Backend, &AttentionSpec, u64) -> Result<CheckReport, String>,
) {
    let failures = check_cases(b, cases, seed, check);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The benchmark times flash and naive for `pass` and measures their extra memory: flash's
/// is more than `ratio` times smaller, naive's at least `naive_min` bytes (its score matrices).
pub fn assert_bench_memory(
    b: &WgpuBackend,
    spec: &AttentionSpec,
    pass: Pass,
    naive_min: u64,
    ratio: u64,
) {
    let plan = BenchPlan {
        warmup: 1,
        iters: 2,
        seed: 1,
        pass,
    };
    let mut runs = 0;
    let flash = b
        .bench(BenchRun::new(spec, Algorithm::Flash, &plan, &mut || {
            runs += 1
        }))
        .expect("flash bench");
    assert_eq!(runs, 3);
    let naive = b
        .bench(BenchRun::new(spec, Algorithm::Naive, &plan, &mut || {}))
        .expect("naive bench");
    assert_eq!(flash.times_ms.len(), 2);
    assert!(flash
        .times_ms
        .iter()
        .chain(&naive.times_ms)
        .all(|t| t.is_finite() && *t > 0.0));
    let (fe, ne) = (flash.extra_bytes.unwrap(), naive.extra_bytes.unwrap());
    assert!(ne >= naive_min, "naive extra {ne}");
    assert!(fe * ratio < ne, "flash extra {fe} vs naive {ne}");
}

/// The whole of `src` (which has COPY_SRC), copied out and mapped.
pub fn read_back(device: &wgpu::Device, queue: &wgpu::Queue, src: &wgpu::Buffer) -> Vec<u8> {
    let read = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: src.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(src, 0, &read, 0, src.size());
    queue.submit([enc.finish()]);
    read.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let bytes = read.get_mapped_range(..).expect("range").to_vec();
    read.unmap();
    bytes
}
