//! The device-resident API on the caller's buffers, wgpu errors surfacing as `Error::Backend`,
//! and the benchmark path (flash vs naive).

mod common;

use flashattn_core::{
    random_inputs, reference_attention, rel_l2_error, Algorithm, AttentionSpec, Backend, BenchPlan,
    BenchRun, DType, Error, ForwardInputs, Pass, Tensor,
};
use flashattn_wgpu::{wgpu, DeviceInputs, DeviceOutputs, WgpuBackend};

fn storage_buffer(device: &wgpu::Device, queue: &wgpu::Queue, bytes: &[u8]) -> wgpu::Buffer {
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (bytes.len() as u64).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().next_multiple_of(4), 0);
    queue.write_buffer(&buf, 0, &padded);
    buf
}

/// `forward_buffers` on whole buffers q, k, v and out, without an LSE.
fn forward_whole(
    b: &WgpuBackend,
    spec: &AttentionSpec,
    [q, k, v, out]: [&wgpu::Buffer; 4],
) -> flashattn_core::Result<()> {
    let inputs = DeviceInputs {
        q: q.into(),
        k: k.into(),
        v: v.into(),
    };
    let outputs = DeviceOutputs {
        out: out.into(),
        lse: None,
    };
    pollster::block_on(b.forward_buffers(spec, inputs, outputs))
}

#[test]
fn forward_buffers_on_a_callers_device() {
    let Some(shared) = common::backend() else {
        return;
    };
    let (device, queue) = (shared.device_handle().clone(), shared.queue().clone());
    let b = WgpuBackend::from_device(device.clone(), queue.clone());
    for dtype in [DType::F32, DType::Bf16] {
        let spec = AttentionSpec::new(2, 4, 33, 70, 64)
            .heads_kv(2)
            .causal(true)
            .dtype(dtype)
            .return_lse(true);
        let (q, k, v) = random_inputs(&spec, 7);
        let up = |t: &Tensor| storage_buffer(&device, &queue, t.as_ref().as_bytes());
        let (qb, kb, vb) = (up(&q), up(&k), up(&v));
        let out_bytes = spec.out_elems().unwrap() * dtype.size_bytes();
        let out = storage_buffer(&device, &queue, &vec![0u8; out_bytes]);
        let lse = storage_buffer(&device, &queue, &vec![0u8; spec.lse_elems().unwrap() * 4]);
        pollster::block_on(b.forward_buffers(
            &spec,
            DeviceInputs {
                q: (&qb).into(),
                k: (&kb).into(),
                v: (&vb).into(),
            },
            DeviceOutputs {
                out: (&out).into(),
                lse: Some((&lse).into()),
            },
        ))
        .expect("forward_buffers");
        let got = Tensor::from_bytes(
            dtype,
            &common::read_back(&device, &queue, &out)[..out_bytes],
        )
        .unwrap();
        let reference = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let err = rel_l2_error(&got.to_f32_vec(), &reference.out);
        assert!(err < dtype.tolerance(), "{dtype}: rel L2 {err:.3e}");
        let lse_got: Vec<f32> =
            bytemuck::pod_collect_to_vec(&common::read_back(&device, &queue, &lse));
        let lse_err = flashattn_core::lse_max_error(&lse_got, &reference.lse);
        assert!(lse_err < 1e-3, "{dtype}: LSE error {lse_err:.3e}");
    }
}

#[test]
fn wgpu_validation_errors_become_backend_errors() {
    let Some(b) = common::backend() else { return };
    let (device, queue) = (b.device_handle(), b.queue());
    let spec = AttentionSpec::new(1, 1, 8, 8, 16);
    let bytes = vec![0u8; 8 * 16 * 4];
    let (qb, kb, vb, out) = (
        storage_buffer(device, queue, &bytes),
        storage_buffer(device, queue, &bytes),
        storage_buffer(device, queue, &bytes),
        storage_buffer(device, queue, &bytes),
    );
    // A destroyed buffer passes our size checks but fails wgpu's validation at submit.
    qb.destroy();
    let err = forward_whole(b, &spec, [&qb, &kb, &vb, &out]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Backend {
                backend: "wgpu",
                ..
            }
        ),
        "{err:?}"
    );
    // The backend still works afterwards.
    flashattn_core::testing::check_backend(b, &spec, 3).expect("forward after an error");
}

#[test]
fn short_buffers_are_rejected_with_sizes() {
    let Some(b) = common::backend() else { return };
    let (device, queue) = (b.device_handle(), b.queue());
    let spec = AttentionSpec::new(1, 1, 8, 8, 16);
    let small = storage_buffer(device, queue, &[0u8; 64]);
    let err = forward_whole(b, &spec, [&small; 4]).unwrap_err();
    assert!(err.to_string().contains("512"), "{err}");
}

#[test]
fn bench_flash_uses_far_less_memory_than_naive() {
    let Some(b) = common::backend() else { return };
    // Naive holds the 2 x 256 x 256 f32 scores; flash 20x less at the least.
    let spec = AttentionSpec::new(1, 2, 256, 256, 64).return_lse(true);
    common::assert_bench_memory(b, &spec, Pass::Forward, 2 * 256 * 256 * 4, 20);
}

#[test]
fn naive_reports_a_score_buffer_that_does_not_fit() {
    let Some(b) = common::backend() else { return };
    // 64 x 8192 x 8192 f32 scores = 16 GiB: beyond any device's largest buffer here.
    let spec = AttentionSpec::new(1, 64, 8192, 8192, 16);
    let plan = BenchPlan {
        warmup: 0,
        iters: 1,
        seed: 1,
        pass: Pass::Forward,
    };
    let err = b
        .bench(BenchRun::new(&spec, Algorithm::Naive, &plan, &mut || {}))
        .unwrap_err();
    assert!(err.to_string().contains("score buffer"), "{err}");
}

/// Scores beyond one storage binding are processed in groups of rows.
#[test]
fn naive_with_chunked_scores_matches_the_reference() {
    let Some(b) = common::backend_with_binding_limit(16 * 1024) else {
        return;
    };
    for spec in [
        AttentionSpec::new(1, 2, 40, 50, 16).return_lse(true),
        AttentionSpec::new(1, 4, 33, 47, 8)
            .heads_kv(2)
            .causal(true)
            .alibi(vec![0.5, 0.25, 0.125, 0.0625], false)
            .return_lse(true),
    ] {
        assert_naive_matches(&b, &spec.to_string(), &spec, 12);
    }
}

/// The naive forward (materialised scores) against the f64 reference.
fn assert_naive_matches(b: &WgpuBackend, name: &str, spec: &AttentionSpec, seed: u64) {
    let (q, k, v) = random_inputs(spec, seed);
    let got = pollster::block_on(b.naive_forward_async(spec, ForwardInputs::of(&q, &k, &v)))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
    let err = rel_l2_error(&got.out.to_f32_vec(), &reference.out);
    assert!(err < 1e-4, "{name}: rel L2 {err:.3e}");
    let lse_err = flashattn_core::lse_max_error(&got.lse.unwrap(), &reference.lse);
    assert!(lse_err < 1e-3, "{name}: LSE {lse_err:.3e}");
}

#[test]
fn naive_matches_the_reference() {
    let Some(b) = common::backend() else { return };
    for (name, spec) in flashattn_core::testing::feature_cases(DType::F32) {
        if spec.is_varlen() {
            continue;
        }
        assert_naive_matches(b, name, &spec, 11);
    }
}

/// On a headless machine (no XDG_RUNTIME_DIR) opening the backend and running a forward pass
/// prints no `error:` (Mesa's device-select layer used to print one per Vulkan instance).
/// Runs itself as a child process with a clean environment.
#[test]
fn a_successful_run_prints_no_error() {
    const CHILD: &str = "FLASHATTN_WGPU_STARTUP_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let Some(b) = common::backend() else { return };
        let spec = AttentionSpec::new(1, 2, 9, 33, 16).return_lse(true);
        flashattn_core::testing::check_backend(b, &spec, 1).expect("forward in the child");
        println!("child ran on {}", b.device_description());
        return;
    }
    if common::backend().is_none() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["a_successful_run_prints_no_error", "--exact", "--nocapture"])
        .env(CHILD, "1")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .env_remove("VK_LOADER_LAYERS_DISABLE")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("child ran on"),
        "child did not run:\n{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains("error:"),
        "stderr has an error line:\n{stderr}"
    );
}
