//! Without a GPU: the decode kernels' real CUDA source (append, split-KV attention with
//! mma.sync or on CUDA cores, combine) run on the CPU by the emulator (tests/emulator/emu.h,
//! tests/emulator/decode_driver.cpp), against `reference_decode` through core's `check_decode`:
//! out, LSE and both caches after the in-place append. The host side is the backend's own:
//! `select_decode`, `decode_plan` (split count, packed-row tile, launches, host tables) and
//! `DecodeParams`. A small SM count makes long caches split, so the combine kernel runs.
//! What this cannot show: speed, races between warps, the device-resident handle's memory
//! traffic (tests/gpu.rs runs those on a GPU).

mod common;

use common::emu::{check_compiler, emulator_source, run_dir, run_with_limit, Drivers};
use flashattn_core::testing::decode::{contiguous, decode_cases, paged, spec};
use flashattn_core::testing::{backend_or_skip, check_decode};
use flashattn_core::{
    validate_decode_inputs, Algorithm, AttentionSpec, Backend, BenchMeasure, BenchPlan, DType,
    DecodeInputs, Error, Output, Result, Tensor, TensorMut, TensorRef,
};
use flashattn_cuda::{decode_plan, select_decode, smem_optin_of_arch, KernelKind, Variant};
use std::path::PathBuf;
use std::time::Duration;

const DRIVER: &str = include_str!("emulator/decode_driver.cpp");

/// The CUDA backend's decode kernels on the emulator, as a `Backend` (decode only).
struct EmulatedDecode {
    arch: &'static str,
    kind: KernelKind,
    /// SMs the split count aims to fill.
    sm_count: usize,
    drivers: Drivers,
}

fn emulated(arch: &'static str, kind: KernelKind, sm_count: usize) -> Option<EmulatedDecode> {
    backend_or_skip("cuda-emulate", || {
        check_compiler()?;
        Ok(EmulatedDecode {
            arch,
            kind,
            sm_count,
            drivers: Drivers::new(),
        })
    })
}

fn unsupported(e: impl Into<String>) -> Error {
    Error::unsupported("cuda-emulate", e)
}

impl EmulatedDecode {
    fn variant(&self, spec: &AttentionSpec) -> Result<Variant> {
        let smem = smem_optin_of_arch(self.arch);
        let cc = if self.arch.starts_with("sm_90") {
            (9, 0)
        } else {
            (8, 0)
        };
        select_decode(&spec.validate()?, cc, smem, self.kind).map_err(unsupported)
    }

    /// The driver of `variant`: the emulator's source of its kernels, the table of its entry
    /// points by name, the driver's main.
    fn driver(&self, variant: &Variant) -> Result<PathBuf> {
        let mut src = emulator_source(variant);
        src.push_str("struct EmuEntry { const char* name; void (*fn)(DecodeParams); };\n");
        src.push_str("static const EmuEntry emu_entries[] = {\n");
        for e in variant.entry_points() {
            src.push_str(&format!("    {{\"{e}\", {e}}},\n"));
        }
        src.push_str("};\n");
        src.push_str(DRIVER);
        self.drivers.get(variant, src, &[])
    }
}

/// Overwrites the host tensor `t` with `bytes` of its dtype (exact: the values came from it).
fn write_back(t: &mut TensorMut<'_>, bytes: &[u8]) -> Result<()> {
    let values = Tensor::from_bytes(t.dtype(), bytes)?.to_f32_vec();
    t.write_f32(0, &values);
    Ok(())
}

impl Backend for EmulatedDecode {
    fn name(&self) -> &'static str {
        "cuda-emulate"
    }

    fn device(&self) -> String {
        format!("CPU emulation of {} ({:?} kernels)", self.arch, self.kind)
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.variant(spec).map(|_| ())
    }

    fn forward(
        &self,
        _: &AttentionSpec,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
    ) -> Result<Output> {
        Err(unsupported(
            "decode kernels only (tests/emulate.rs runs the forward)",
        ))
    }

    fn decode(&self, spec: &AttentionSpec, mut inputs: DecodeInputs<'_>) -> Result<Output> {
        let c = validate_decode_inputs(spec, &inputs)?;
        let variant = self.variant(spec)?;
        let plan = decode_plan(&c, &variant, self.sm_count)?;
        let bin = self.driver(&variant)?;
        let io = |e: std::io::Error| Error::backend("cuda-emulate", e);
        let dir = run_dir(&self.drivers.dir);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(io);
        let es = spec.dtype.size_bytes();
        let out_bytes = c.sizes.out * spec.dtype.output().size_bytes();
        let lse_floats = if spec.return_lse { c.sizes.lse } else { 0 };
        write("params.bin", bytemuck::bytes_of(&plan.params))?;
        write(
            "sizes.txt",
            format!(
                "{out_bytes} {lse_floats} {} {} {}",
                plan.q_rot * es,
                plan.part_out,
                plan.part_lse
            )
            .as_bytes(),
        )?;
        let entries = variant.entry_points();
        let mut launches = String::new();
        for a in &plan.appends {
            let l = a.launch;
            let (b0, n, rq) = (a.b0, a.batches, a.rotate_q as i32);
            launches += &format!("{} {} {} {b0} {n} {rq}\n", entries[0], l.grid.0, l.block);
        }
        let (s, e) = (plan.split, entries[plan.split_entry]);
        launches += &format!("{e} {} {} 0 0 0\n", s.grid.0, s.block);
        if let Some(l) = plan.combine {
            launches += &format!("{} {} {} 0 0 0\n", entries[1], l.grid.0, l.block);
        }
        write("launches.txt", launches.as_bytes())?;
        write("q.bin", inputs.q.as_bytes())?;
        write("k_cache.bin", inputs.k_cache.as_ref().as_bytes())?;
        write("v_cache.bin", inputs.v_cache.as_ref().as_bytes())?;
        if let (Some(k), Some(v)) = (&inputs.k_new, &inputs.v_new) {
            write("k_new.bin", k.as_bytes())?;
            write("v_new.bin", v.as_bytes())?;
        }
        let t = &plan.tables;
        write("seqlens.bin", bytemuck::cast_slice(&t.seqlens))?;
        for (name, ints) in [
            ("block_table.bin", &t.block_table),
            ("batch_idx.bin", &t.batch_idx),
        ] {
            if !ints.is_empty() {
                write(name, bytemuck::cast_slice(ints))?;
            }
        }
        let floats = [
            ("rot_cos.bin", &t.rot_cos),
            ("rot_sin.bin", &t.rot_sin),
            ("alibi.bin", &t.alibi),
        ];
        for (name, f) in floats {
            if !f.is_empty() {
                write(name, bytemuck::cast_slice(f))?;
            }
        }
        run_with_limit(&bin, &dir, Duration::from_secs(600))
            .map_err(|e| Error::backend("cuda-emulate", format!("{}: {e}", variant.name())))?;
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(io);
        let out = Tensor::from_bytes(spec.dtype.output(), &read("out.bin")?)?;
        let lse = spec
            .return_lse
            .then(|| read("lse.bin").map(|b| bytemuck::pod_collect_to_vec(&b)))
            .transpose()?;
        write_back(&mut inputs.k_cache, &read("k_out.bin")?)?;
        write_back(&mut inputs.v_cache, &read("v_out.bin")?)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Output { out, lse })
    }

    fn bench(
        &self,
        _: &AttentionSpec,
        _: Algorithm,
        _: &BenchPlan,
        _: &mut dyn FnMut(),
    ) -> Result<BenchMeasure> {
        Err(unsupported("no timings in emulation"))
    }
}

/// Every case on `b`; one line per failure.
fn run(b: &EmulatedDecode, cases: &[(String, AttentionSpec)], seed: u64) {
    let start = std::time::Instant::now();
    let failures: Vec<String> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, (name, spec))| {
            check_decode(b, spec, seed + i as u64)
                .err()
                .map(|e| format!("{name}: {e}"))
        })
        .collect();
    println!(
        "{}: {} cases, {} failed, {:.1} s",
        b.device(),
        cases.len(),
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn named(dtype: DType) -> Vec<(String, AttentionSpec)> {
    decode_cases(dtype)
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect()
}

#[test]
fn mma_decode_cases_bf16_sm80() {
    let Some(b) = emulated("sm_80", KernelKind::DecodeMma, 8) else {
        return;
    };
    run(&b, &named(DType::Bf16), 100);
}

#[test]
fn mma_decode_cases_f16_sm89() {
    let Some(b) = emulated("sm_89", KernelKind::DecodeMma, 8) else {
        return;
    };
    run(&b, &named(DType::F16), 200);
}

#[test]
fn simt_decode_cases_f32() {
    let Some(b) = emulated("sm_80", KernelKind::DecodeSimt, 8) else {
        return;
    };
    run(&b, &named(DType::F32), 300);
}

/// The 64-row tile (more than 16 packed rows: GQA 32/8 with 5 query rows), splits and the
/// combine on a page-16 cache of 1000+ rows, and the CUDA-core kernel on bf16 (forced).
#[test]
fn wide_tiles_splits_and_forced_simt() {
    let cases = vec![
        (
            "GQA 32/8, 5 query rows: 20 packed rows".to_string(),
            spec(32, 8, 5, 128, paged(&[1000, 17], 5, 16, 0)).dtype(DType::Bf16),
        ),
        (
            "MQA 16 heads, 1 KV head, no LSE".to_string(),
            spec(16, 1, 1, 64, contiguous(&[1000], 1, 0))
                .return_lse(false)
                .dtype(DType::Bf16),
        ),
    ];
    if let Some(b) = emulated("sm_80", KernelKind::DecodeMma, 16) {
        run(&b, &cases, 400);
    }
    if let Some(b) = emulated("sm_80", KernelKind::DecodeSimt, 16) {
        run(&b, &cases, 500);
    }
}
