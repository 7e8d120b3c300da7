//! Output files of `run`, checked before any work: none may be an input or another output
//! (compared as canonical paths and, where the files exist, as the same file on disk, so
//! symlinks and hard links count), and each directory must take a new file. Each output is
//! written to a temporary file beside its target and renamed over it, so an input is never
//! overwritten and a failed run never leaves a truncated file.

use super::{npy, CliResult};
use flashattn::DType;
use std::io::Write;
use std::path::{Path, PathBuf};
use tempfile::NamedTempFile;

/// A flag naming a file, e.g. ("--out", "o.npy").
pub type FileArg<'a> = (&'static str, &'a Path);

/// The outputs of one run, each with its temporary file already created.
pub struct Outputs {
    pending: Vec<(&'static str, PathBuf, NamedTempFile)>,
}

impl Outputs {
    /// Checks `outputs` against each other and against `inputs`, and creates the temporary
    /// file of each output (which proves its directory writable).
    pub fn prepare(outputs: &[FileArg<'_>], inputs: &[FileArg<'_>]) -> CliResult<Outputs> {
        let mut seen: Vec<(&str, &Path, Identity)> = Vec::new();
        for &(flag, path) in inputs {
            seen.push((flag, path, Identity::of(path, flag)?));
        }
        let mut pending = Vec::new();
        for &(flag, path) in outputs {
            let id = Identity::of(path, flag)?;
            if let Some((other, other_path, _)) = seen.iter().find(|(_, _, s)| s.same(&id)) {
                return Err(format!(
                    "{flag} {} is the same file as {other} {}: refusing to overwrite it",
                    path.display(),
                    other_path.display()
                ));
            }
            if path.is_dir() {
                return Err(format!("{flag} {} is a directory", path.display()));
            }
            pending.push((flag, path.to_path_buf(), temp_beside(path, flag)?));
            seen.push((flag, path, id));
        }
        Ok(Outputs { pending })
    }

    /// Whether the output of `flag` was asked for (and is not written yet).
    pub fn wants(&self, flag: &str) -> bool {
        self.pending.iter().any(|p| p.0 == flag)
    }

    /// Writes the output of `flag` (if it was asked for) as .npy and puts it in place.
    pub fn write(
        &mut self,
        flag: &str,
        shape: &[usize],
        values: &[f32],
        dtype: DType,
    ) -> CliResult<()> {
        self.write_with(flag, |w| npy::write(w, shape, values, dtype))
    }

    /// Writes the output of `flag` (if it was asked for) with `fill` and puts it in place.
    pub fn write_with(
        &mut self,
        flag: &str,
        fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> CliResult<()> {
        let Some(i) = self.pending.iter().position(|p| p.0 == flag) else {
            return Ok(());
        };
        let (_, target, tmp) = self.pending.swap_remove(i);
        let fail = |e: std::io::Error| format!("cannot write {flag} {}: {e}", target.display());
        {
            let mut w = std::io::BufWriter::new(tmp.as_file());
            fill(&mut w).map_err(fail)?;
            w.flush().map_err(fail)?;
        }
        tmp.persist(&target).map_err(|e| fail(e.error))?;
        Ok(())
    }
}

/// What a path refers to: its canonical form and, for an existing file, its device and inode.
struct Identity {
    canonical: PathBuf,
    file: Option<(u64, u64)>,
}

impl Identity {
    fn of(path: &Path, flag: &str) -> CliResult<Identity> {
        let bad = |e: std::io::Error| format!("{flag} {}: {e}", path.display());
        if let Ok(meta) = std::fs::metadata(path) {
            return Ok(Identity {
                canonical: std::fs::canonicalize(path).map_err(bad)?,
                file: file_id(&meta),
            });
        }
        // A new file: its directory must exist.
        let name = path
            .file_name()
            .ok_or_else(|| format!("{flag} {} is not a file name", path.display()))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::canonicalize(dir).map_err(|e| {
            format!(
                "{flag} {}: directory {}: {e}",
                path.display(),
                dir.display()
            )
        })?;
        Ok(Identity {
            canonical: dir.join(name),
            file: None,
        })
    }

    fn same(&self, other: &Identity) -> bool {
        self.canonical == other.canonical || (self.file.is_some() && self.file == other.file)
    }
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// An empty temporary file in `target`'s directory, created with the usual permissions.
fn temp_beside(target: &Path, flag: &str) -> CliResult<NamedTempFile> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder.tempfile_in(dir).map_err(|e| {
        format!(
            "cannot write {flag} {}: directory {} does not take a new file: {e}",
            target.display(),
            dir.display()
        )
    })
}
