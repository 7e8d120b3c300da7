//! Without a GPU: what `forward_device_with_tables` relies on, on the CPU emulator. The launch
//! and `KernelParams` come from a host spec built by `varlen_bounds` (batch, token totals,
//! longest sequences) with zero ALiBi slopes, while the kernel reads the real cu_seqlens and
//! slopes from its tables (the driver's cu_q.bin, cu_k.bin, alibi.bin, as the device tables
//! would be): the output must match the f64 reference of the real problem. Needs a C++20
//! compiler; skips with the reason without one, unless FLASHATTN_REQUIRE_BACKENDS names
//! cuda-emulate.

mod common;

use common::emu::{emulator_source, run_driver};
use common::emulated::Emulated;
use flashattn_core::testing::backend_or_skip;
use flashattn_core::{random_inputs, reference_attention, rel_l2_error, AttentionSpec, DType};
use flashattn_cuda::{
    flash_launch, select_generic, select_mma, smem_optin_of_arch, varlen_bounds, KernelKind,
};

const DRIVER: &str = include_str!("emulator/driver.cpp");

fn bounds_launch_reads_real_tables(kind: KernelKind, dtype: DType) {
    let Some(emu) = backend_or_skip("cuda-emulate", || Emulated::new("sm_80", kind, 0)) else {
        return;
    };
    // Sequence lengths 17, 1, 0, 40 (q) and 20, 33, 5, 48 (k); causal and ALiBi per batch.
    let (cu_q, cu_k) = (vec![0, 17, 18, 18, 58], vec![0, 20, 53, 58, 106]);
    let slopes: Vec<f32> = (0..4 * 2).map(|i| 0.05 * (i + 1) as f32).collect();
    let real = AttentionSpec::new(4, 2, 58, 106, 40)
        .dtype(dtype)
        .varlen(cu_q, cu_k)
        .alibi(slopes, true)
        .causal(true)
        .return_lse(true);
    let (bq, bk) = varlen_bounds(4, (58, 106), (40, 48)).unwrap();
    let host = real.clone().varlen(bq, bk).alibi(vec![0.0; 8], true);
    let checked = host.validate().unwrap();
    let smem = smem_optin_of_arch("sm_80");
    let variant = match kind {
        KernelKind::Mma => select_mma(&checked, (8, 0), smem, None),
        _ => select_generic(&checked, smem),
    }
    .unwrap();
    let entry = variant.entry_points()[0];
    let smem_t = if kind == KernelKind::Generic {
        "float"
    } else {
        "uint8_t"
    };
    let defines = [
        format!("-DEMU_KERNEL={entry}"),
        format!("-DEMU_SMEM_T={smem_t}"),
    ];
    let source = emulator_source(&variant) + DRIVER;
    let bin = emu.drivers.get(&variant, source, &defines).unwrap();
    let (params, l) = flash_launch(&checked, &variant, 1).unwrap();
    let out_bytes = checked.sizes.out * dtype.output().size_bytes();
    let launch = format!(
        "{} {} {} {} {out_bytes} {}",
        l.grid.0, l.grid.1, l.grid.2, l.block, checked.sizes.lse
    );
    let (q, k, v) = random_inputs(&real, 7);
    let (q, k, v) = (q.as_ref(), k.as_ref(), v.as_ref());
    let files: [(&str, &[u8]); 5] = [
        ("params.bin", bytemuck::bytes_of(&params)),
        ("launch.txt", launch.as_bytes()),
        ("q.bin", q.as_bytes()),
        ("k.bin", k.as_bytes()),
        ("v.bin", v.as_bytes()),
    ];
    // The real spec's tables: what the caller's device tables hold.
    let dir = run_driver(&emu.drivers.dir, &bin, &variant.name(), &real, &files).unwrap();
    let out = std::fs::read(dir.join("out.bin")).unwrap();
    let out = flashattn_core::Tensor::from_bytes(dtype.output(), &out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let want = reference_attention(&real, q, k, v).unwrap();
    let err = rel_l2_error(&out.to_f32_vec(), &want.out);
    assert!(
        err <= dtype.tolerance(),
        "{kind:?} {real}: rel L2 {err:.2e}"
    );
}

#[test]
fn mma_launch_from_bounds_reads_real_tables() {
    bounds_launch_reads_real_tables(KernelKind::Mma, DType::Bf16);
}

#[test]
fn generic_launch_from_bounds_reads_real_tables() {
    bounds_launch_reads_real_tables(KernelKind::Generic, DType::F32);
}
