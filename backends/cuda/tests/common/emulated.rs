//! The CUDA backend's kernels on the emulator, as one `Backend` for tests/emulate.rs (forward
//! and backward: mma.sync and portable kinds) and tests/emulate_decode.rs (decode kinds). The
//! host side is the backend's own: variant selection, params and launch plans.

use super::emu::{check_compiler, emulator_source, run_dir, run_driver, run_with_limit, Drivers};
use flashattn_core::{
    validate_backward_inputs, validate_decode_inputs, validate_inputs, AttentionSpec, Backend,
    BackwardInputs, DecodeInputs, Error, ForwardInputs, Grads, Output, Pass, Result, Tensor,
    TensorMut,
};
use flashattn_cuda::{
    backward_plan, decode_plan, flash_launch, select_decode, select_generic, select_generic_bwd,
    select_mma, select_mma_bwd, smem_optin_of_arch, DecodePlan, DecodeTables, KernelKind, Variant,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DRIVER: &str = include_str!("../emulator/driver.cpp");
/// The backward's driver: runs a backward plan's launches (prep, main, post or dq) in order.
const DRIVER_BWD: &str = include_str!("../emulator/driver_bwd.cpp");
const DRIVER_DECODE: &str = include_str!("../emulator/decode_driver.cpp");

/// The kernels of `kind` as an `arch` GPU would choose them.
pub struct Emulated {
    pub arch: &'static str,
    pub kind: KernelKind,
    /// SMs the decode split count aims to fill.
    pub sm_count: usize,
    pub drivers: Drivers,
}

fn unsupported(e: impl Into<String>) -> Error {
    Error::unsupported("cuda-emulate", e)
}

fn io(e: std::io::Error) -> Error {
    Error::backend("cuda-emulate", e)
}

impl Emulated {
    /// The emulator for `kind` kernels on `arch` (decode splits aim at `sm_count` SMs), if a
    /// C++ compiler works.
    pub fn new(arch: &'static str, kind: KernelKind, sm_count: usize) -> Result<Emulated> {
        check_compiler()?;
        Ok(Emulated {
            arch,
            kind,
            sm_count,
            drivers: Drivers::new(),
        })
    }

    /// The forward (or, for the decode kinds, the decode) variant of `spec`.
    fn variant(&self, spec: &AttentionSpec) -> Result<Variant> {
        let checked = spec.validate()?;
        let smem = smem_optin_of_arch(self.arch);
        let cc = if self.arch.starts_with("sm_90") {
            (9, 0)
        } else {
            (8, 0)
        };
        match self.kind {
            KernelKind::Mma => select_mma(&checked, (8, 0), smem, None),
            KernelKind::Generic => select_generic(&checked, smem),
            KernelKind::DecodeMma | KernelKind::DecodeSimt => {
                select_decode(&checked, cc, smem, self.kind)
            }
            k => Err(format!("{k:?} is not emulated")),
        }
        .map_err(unsupported)
    }

    /// The variant of `spec` for `pass`, which `self.kind` must run.
    fn variant_for(&self, spec: &AttentionSpec, pass: Pass) -> Result<Variant> {
        let v = self.variant(spec)?;
        if v.kind.def().pass != pass {
            return Err(unsupported(format!(
                "{:?} kernels do not run the {} pass",
                self.kind,
                pass.name()
            )));
        }
        Ok(v)
    }

    /// The backward family of `kind` (mma.sync, portable) for `spec`, as an `arch` GPU picks it.
    fn backward_variant(&self, spec: &AttentionSpec) -> Result<Variant> {
        let checked = spec.validate()?;
        let v = match self.kind {
            KernelKind::Mma => select_mma_bwd(&checked, (8, 0), smem_optin_of_arch(self.arch)),
            KernelKind::Generic => select_generic_bwd(&checked),
            k => Err(format!("{k:?} has no emulated backward")),
        };
        v.map_err(unsupported)
    }

    /// The driver binary of `variant`: the emulator's source of its kernels and the driver's
    /// main for its pass (the backward's runs a plan's launches: its entry points main and
    /// dq kernel; the decode's finds its entry points by name in a table).
    fn driver(&self, variant: &Variant) -> Result<PathBuf> {
        let mut src = emulator_source(variant);
        let entries = variant.entry_points();
        let mut extra = match variant.kind.def().pass {
            Pass::Backward => {
                src.push_str(DRIVER_BWD);
                vec![
                    format!("-DEMU_MAIN={}", entries[2]),
                    format!("-DEMU_DQ={}", entries[3]),
                ]
            }
            Pass::Decode => {
                src.push_str("struct EmuEntry { const char* name; void (*fn)(DecodeParams); };\n");
                src.push_str("static const EmuEntry emu_entries[] = {\n");
                for e in entries {
                    src.push_str(&format!("    {{\"{e}\", {e}}},\n"));
                }
                src.push_str("};\n");
                src.push_str(DRIVER_DECODE);
                return self.drivers.get(variant, src, &[]);
            }
            _ => {
                src.push_str(DRIVER);
                vec![format!("-DEMU_KERNEL={}", entries[0])]
            }
        };
        let smem_t = if variant.kind == KernelKind::Generic {
            "float"
        } else {
            "uint8_t"
        };
        extra.push(format!("-DEMU_SMEM_T={smem_t}"));
        self.drivers.get(variant, src, &extra)
    }
}

/// The output and (when asked for) LSE a driver wrote into `dir`.
fn read_output(spec: &AttentionSpec, dir: &Path) -> Result<Output> {
    let read = |name: &str| std::fs::read(dir.join(name)).map_err(io);
    let out = Tensor::from_bytes(spec.dtype.output(), &read("out.bin")?)?;
    let lse = spec
        .return_lse
        .then(|| read("lse.bin").map(|b| bytemuck::pod_collect_to_vec(&b)))
        .transpose()?;
    Ok(Output { out, lse })
}

/// Overwrites the host tensor `t` with `bytes` of its dtype (exact: the values came from it).
fn write_back(t: &mut TensorMut<'_>, bytes: &[u8]) -> Result<()> {
    let values = Tensor::from_bytes(t.dtype(), bytes)?.to_f32_vec();
    t.write_f32(0, &values);
    Ok(())
}

/// The launch lines of a decode plan for decode_driver.cpp: entry point, grid, block, and
/// for the appends their batch range and whether q is rotated.
fn decode_launches(variant: &Variant, plan: &flashattn_cuda::DecodePlan) -> String {
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
    launches
}

impl Backend for Emulated {
    fn name(&self) -> &'static str {
        "cuda-emulate"
    }

    fn device(&self) -> String {
        format!("CPU emulation of {} ({:?} kernels)", self.arch, self.kind)
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.variant(spec).map(|_| ())
    }

    fn forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output> {
        let ForwardInputs { q, k, v } = inputs;
        let checked = validate_inputs(spec, &q, &k, &v)?;
        let variant = self.variant_for(spec, Pass::Forward)?;
        let bin = self.driver(&variant)?;
        let (params, launch) = flash_launch(&checked, &variant, 1)?;
        let out_bytes = checked.sizes.out * spec.dtype.output().size_bytes();
        let lse_floats = if spec.return_lse {
            checked.sizes.lse
        } else {
            0
        };
        let launch_txt = format!(
            "{} {} {} {} {out_bytes} {lse_floats}",
            launch.grid.0, launch.grid.1, launch.grid.2, launch.block
        );
        let files: [(&str, &[u8]); 5] = [
            ("params.bin", bytemuck::bytes_of(&params)),
            ("launch.txt", launch_txt.as_bytes()),
            ("q.bin", q.as_bytes()),
            ("k.bin", k.as_bytes()),
            ("v.bin", v.as_bytes()),
        ];
        let dir = run_driver(&self.drivers.dir, &bin, &variant.name(), spec, &files)?;
        let output = read_output(spec, &dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(output)
    }

    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        self.backward_variant(spec).map(|_| ())
    }

    /// The backend's own launch plan (`backward_plan`) run by the backward driver.
    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        let checked = validate_backward_inputs(spec, &inputs)?;
        let variant = self.backward_variant(spec)?;
        let bin = self.driver(&variant)?;
        let plan = backward_plan(&checked, &variant)?;
        let es = spec.dtype.size_bytes();
        let sizes = &checked.sizes;
        let mut launches = format!(
            "{} {} {} {} {}\n",
            sizes.q * es,
            sizes.k * es,
            sizes.v * es,
            sizes.lse,
            plan.dq_accum
        );
        for (stage, l) in &plan.launches {
            let (x, y, z) = l.grid;
            launches.push_str(&format!("{} {x} {y} {z} {}\n", *stage as u8, l.block));
        }
        let files: [(&str, &[u8]); 8] = [
            ("params.bin", bytemuck::bytes_of(&plan.params)),
            ("launches.txt", launches.as_bytes()),
            ("q.bin", inputs.q.as_bytes()),
            ("k.bin", inputs.k.as_bytes()),
            ("v.bin", inputs.v.as_bytes()),
            ("out.bin", inputs.out.as_bytes()),
            ("lse.bin", bytemuck::cast_slice(inputs.lse)),
            ("dout.bin", inputs.dout.as_bytes()),
        ];
        let dir = run_driver(&self.drivers.dir, &bin, &variant.name(), spec, &files)?;
        let read = |name: &str| -> Result<Tensor> {
            Tensor::from_bytes(spec.dtype, &std::fs::read(dir.join(name)).map_err(io)?)
        };
        let grads = Grads {
            dq: read("dq.bin")?,
            dk: read("dk.bin")?,
            dv: read("dv.bin")?,
        };
        let _ = std::fs::remove_dir_all(&dir);
        Ok(grads)
    }

    /// The backend's own decode plan (`decode_plan`: appends, split, combine) run by the
    /// decode driver; the caches come back appended.
    fn decode(&self, spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        let c = validate_decode_inputs(spec, &inputs)?;
        let variant = self.variant_for(spec, Pass::Decode)?;
        let plan = decode_plan(&c, &variant, self.sm_count)?;
        self.run_decode(spec, &plan, &plan.tables, inputs)
    }
}

impl Emulated {
    /// Runs `plan` (of `spec`) by the decode driver on `inputs`, the kernels reading `tables`
    /// (the plan's host tables, or what a caller's device tables would hold); the caches come
    /// back appended.
    pub fn run_decode(
        &self,
        spec: &AttentionSpec,
        plan: &DecodePlan,
        tables: &DecodeTables,
        mut inputs: DecodeInputs<'_>,
    ) -> Result<Output> {
        let variant = plan.variant;
        let c = spec.validate()?;
        let bin = self.driver(&variant)?;
        let dir = run_dir(&self.drivers.dir);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(io);
        let es = spec.dtype.size_bytes();
        let out_bytes = c.sizes.out * spec.dtype.output().size_bytes();
        let lse_floats = if spec.return_lse { c.sizes.lse } else { 0 };
        write("params.bin", bytemuck::bytes_of(&plan.params))?;
        let (q_rot, part_out, part_lse) = (plan.q_rot * es, plan.part_out, plan.part_lse);
        let sizes = format!("{out_bytes} {lse_floats} {q_rot} {part_out} {part_lse}");
        write("sizes.txt", sizes.as_bytes())?;
        write("launches.txt", decode_launches(&variant, plan).as_bytes())?;
        write("q.bin", inputs.q.as_bytes())?;
        write("k_cache.bin", inputs.k_cache.as_ref().as_bytes())?;
        write("v_cache.bin", inputs.v_cache.as_ref().as_bytes())?;
        if let (Some(k), Some(v)) = (&inputs.k_new, &inputs.v_new) {
            write("k_new.bin", k.as_bytes())?;
            write("v_new.bin", v.as_bytes())?;
        }
        let t = tables;
        write("seqlens.bin", bytemuck::cast_slice(&t.seqlens))?;
        let ints = [
            ("block_table.bin", &t.block_table),
            ("batch_idx.bin", &t.batch_idx),
        ];
        for (name, ints) in ints {
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
        let output = read_output(spec, &dir)?;
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(io);
        write_back(&mut inputs.k_cache, &read("k_out.bin")?)?;
        write_back(&mut inputs.v_cache, &read("v_out.bin")?)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(output)
    }
}
