//! Reading and writing .npy files (f32 and f16, C order).

use super::CliResult;
use flashattn::{DType, Tensor};
use half::f16;
use npyz::WriterBuilder;
use std::path::Path;

/// A tensor read from a .npy file: its shape and values in the file's dtype.
pub struct NpyTensor {
    pub shape: Vec<usize>,
    pub data: Tensor,
}

pub fn read(path: &Path) -> CliResult<NpyTensor> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = npyz::NpyFile::new(&bytes[..])
        .map_err(|e| format!("{} is not a valid .npy file: {e}", path.display()))?;
    if file.order() != npyz::Order::C {
        return Err(format!(
            "{}: Fortran-ordered arrays are not supported; save it in C order",
            path.display()
        ));
    }
    let shape: Vec<usize> = file.shape().iter().map(|&d| d as usize).collect();
    let descr = match file.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => format!("{other:?}"),
    };
    let data = match descr.as_str() {
        "<f4" => Tensor::F32(
            file.into_vec::<f32>()
                .map_err(|e| format!("{}: {e}", path.display()))?,
        ),
        "<f2" => Tensor::F16(
            file.into_vec::<f16>()
                .map_err(|e| format!("{}: {e}", path.display()))?,
        ),
        _ => {
            return Err(format!(
                "{}: dtype {descr} is not supported (use float32 '<f4' or float16 '<f2')",
                path.display()
            ))
        }
    };
    Ok(NpyTensor { shape, data })
}

/// Writes `values` with `shape`, as f32 or f16 (`dtype`).
pub fn write(path: &Path, shape: &[usize], values: &[f32], dtype: DType) -> CliResult<()> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let file = std::fs::File::create(path).map_err(fail)?;
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut buf = std::io::BufWriter::new(file);
    match dtype {
        DType::F16 => {
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(&mut buf)
                .begin_nd()
                .map_err(fail)?;
            w.extend(values.iter().map(|&x| f16::from_f32(x)))
                .map_err(fail)?;
            w.finish().map_err(fail)?;
        }
        _ => {
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(&mut buf)
                .begin_nd()
                .map_err(fail)?;
            w.extend(values.iter().copied()).map_err(fail)?;
            w.finish().map_err(fail)?;
        }
    }
    Ok(())
}
