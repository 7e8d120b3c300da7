//! The inputs of `run`: q, k, v (and dout for the backward) from .npy files or random, with
//! the problem's spec; sizes are checked against the host-memory budget before random inputs
//! are made.

use super::shape::ShapeArgs;
use super::{budget, npy, CliResult};
use flashattn::{random_inputs, random_tensor, AttentionSpec, DType, Pass, Tensor};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// The problem and its inputs in the compute dtype, and the dtype output files are written in
/// (the input files', or f32 for random bf16 inputs).
pub struct Problem {
    pub spec: AttentionSpec,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub file_dtype: DType,
}

/// Where the inputs come from.
pub struct InputArgs<'a> {
    pub shape: &'a ShapeArgs,
    pub files: Option<(&'a Path, &'a Path, &'a Path)>,
    pub alibi: Option<&'a PathBuf>,
    pub seed: u64,
    pub pass: Pass,
    pub check: bool,
    pub return_lse: bool,
}

impl Problem {
    pub fn load(a: &InputArgs<'_>) -> CliResult<Problem> {
        let mut problem = match a.files {
            Some((q, k, v)) => from_files(a.shape, q, k, v)?,
            None => {
                let spec = a.shape.to_spec()?;
                let bytes = budget::run_bytes(&spec, a.pass, a.check);
                budget::check("the inputs and results of this run", bytes)?;
                let (q, k, v) = random_inputs(&spec, a.seed);
                let file_dtype = match spec.dtype {
                    DType::F16 => DType::F16,
                    _ => DType::F32,
                };
                Problem {
                    spec,
                    q,
                    k,
                    v,
                    file_dtype,
                }
            }
        };
        if let Some(path) = a.alibi {
            problem.spec = with_alibi(problem.spec, path)?;
        }
        problem.spec.return_lse = a.return_lse;
        problem.spec.validate().map_err(|e| e.to_string())?;
        if a.files.is_some() {
            let bytes = budget::run_bytes(&problem.spec, a.pass, a.check);
            budget::check("the results of this run", bytes)?;
        }
        Ok(problem)
    }

    /// The gradient of the output: from `path` (shaped like the output) or random (`seed`).
    pub fn dout(&self, path: Option<&Path>, seed: u64) -> CliResult<Tensor> {
        let spec = &self.spec;
        let out_dtype = spec.dtype.output();
        let n = spec.out_elems().unwrap_or(0);
        let Some(path) = path else {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xd0_07);
            return Ok(random_tensor(&mut rng, out_dtype, n));
        };
        let t = npy::read(path)?;
        let want = [spec.batch, spec.seqlen_q, spec.heads_q, spec.head_dim_v];
        if t.shape != want {
            return Err(format!(
                "--dout {} has shape {:?}; expected the output's {want:?}",
                path.display(),
                t.shape
            ));
        }
        Ok(convert(t.data, out_dtype))
    }
}

fn from_files(shape: &ShapeArgs, q: &Path, k: &Path, v: &Path) -> CliResult<Problem> {
    let given = shape.given_shape_flags();
    if !given.is_empty() {
        return Err(format!(
            "{} cannot be combined with --q/--k/--v: the shape comes from the files",
            given.join(", ")
        ));
    }
    let (q, k, v) = (load4(q, "q")?, load4(k, "k")?, load4(v, "v")?);
    let file_dtype = q.data.dtype();
    for (name, t) in [("k", &k), ("v", &v)] {
        if t.data.dtype() != file_dtype {
            return Err(format!(
                "--{name} is {} but --q is {file_dtype}",
                t.data.dtype()
            ));
        }
    }
    let [b, sq, h, d] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let [kb, sk, hkv, kd] = [k.shape[0], k.shape[1], k.shape[2], k.shape[3]];
    if kb != b || kd != d {
        return Err(format!(
            "--k has shape {:?}, expected [{b}, seqlen_k, kv_heads, {d}] to match --q {:?}",
            k.shape, q.shape
        ));
    }
    if v.shape[0] != b || v.shape[1] != sk || v.shape[2] != hkv {
        return Err(format!(
            "--v has shape {:?}, expected [{b}, {sk}, {hkv}, head_dim_v] to match --k {:?}",
            v.shape, k.shape
        ));
    }
    let dtype = shape.dtype.unwrap_or(file_dtype);
    let spec = shape
        .mask
        .apply(
            AttentionSpec::new(b, h, sq, sk, d)
                .heads_kv(hkv)
                .head_dim_v(v.shape[3])
                .dtype(dtype),
        )
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Problem {
        spec,
        q: convert(q.data, dtype),
        k: convert(k.data, dtype),
        v: convert(v.data, dtype),
        file_dtype,
    })
}

fn convert(t: Tensor, dtype: DType) -> Tensor {
    if t.dtype() == dtype {
        t
    } else {
        Tensor::from_f32(dtype, &t.to_f32_vec())
    }
}

fn load4(path: &Path, name: &str) -> CliResult<npy::NpyTensor> {
    let t = npy::read(path)?;
    if t.shape.len() != 4 {
        return Err(format!(
            "--{name} {} has shape {:?}; expected 4 dimensions [batch, seqlen, heads, head_dim]",
            path.display(),
            t.shape
        ));
    }
    Ok(t)
}

pub fn with_alibi(spec: AttentionSpec, path: &Path) -> CliResult<AttentionSpec> {
    let t = npy::read(path)?;
    let per_batch = match t.shape.as_slice() {
        [h] if *h == spec.heads_q => false,
        [b, h] if *b == spec.batch && *h == spec.heads_q => true,
        other => {
            return Err(format!(
                "--alibi {} has shape {other:?}; expected [{}] or [{}, {}]",
                path.display(),
                spec.heads_q,
                spec.batch,
                spec.heads_q
            ))
        }
    };
    Ok(spec.alibi(t.data.to_f32_vec(), per_batch))
}
