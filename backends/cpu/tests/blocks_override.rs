//! `FLASHATTN_CPU_BLOCKS` / `FLASHATTN_CPU_BWD_BLOCKS` are read once per process, so each
//! value runs in a child process (this test binary again, filtered to `child`): hostile
//! values (the product that used to wrap and corrupt the heap) are ignored and the results
//! stay exact; valid values are used and stay exact too (f32, and bf16 on the default
//! instruction set, which is the f16 tiles' path where the CPU has AVX512-FP16).

use flashattn_core::testing::{check_backend, check_backward};
use flashattn_core::{AttentionSpec, DType};
use flashattn_cpu::CpuBackend;
use std::process::Command;

/// Runs in the child: forward and backward of a few specs against the reference.
#[test]
#[ignore = "run by `overrides_never_corrupt_memory` in a child process"]
fn child() {
    let specs = [
        AttentionSpec::new(1, 2, 300, 260, 64),
        AttentionSpec::new(2, 2, 97, 130, 40).causal(true),
        AttentionSpec::new(1, 4, 50, 400, 72)
            .heads_kv(2)
            .window(60, 5),
        // bf16: the f16 tiles' layouts on AVX512-FP16 (key blocks rounded to 32-key
        // registers), the widened path elsewhere.
        AttentionSpec::new(1, 2, 130, 171, 72)
            .dtype(DType::Bf16)
            .causal(true),
    ];
    for threads in [1, 3] {
        let b = CpuBackend::with_threads(threads);
        for (i, spec) in specs.iter().enumerate() {
            let spec = spec.clone().return_lse(true);
            check_backend(&b, &spec, 90 + i as u64).unwrap();
            check_backward(&b, &spec, 90 + i as u64).unwrap();
        }
    }
}

#[test]
fn overrides_never_corrupt_memory() {
    let exe = std::env::current_exe().unwrap();
    for value in [
        "48,384307168202282326",
        "18446744073709551568,128",
        "48,18446744073709551615",
        "2064,128",
        "0,0",
        "47,128",
        "garbage",
        "48,1",
        "96,64",
        "2016,2048",
    ] {
        for var in ["FLASHATTN_CPU_BLOCKS", "FLASHATTN_CPU_BWD_BLOCKS"] {
            let out = Command::new(&exe)
                .args(["--exact", "child", "--ignored", "--test-threads", "1"])
                .env(var, value)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{var}={value}: child failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
