//! Small JSON files in the cache directory that several processes update at once (autotune
//! timings, canary verdicts). An update re-reads the file under an exclusive lock, applies the
//! change and replaces the file through a temporary file of its own, so concurrent
//! writers never lose each other's entries and a reader never sees half a file.

use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Files larger than this are not a cache we wrote: ignored rather than read.
const MAX_BYTES: u64 = 16 << 20;

pub(crate) struct JsonStore {
    path: PathBuf,
}

impl JsonStore {
    pub fn new(dir: &Path, file: &str) -> JsonStore {
        JsonStore {
            path: dir.join(file),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's content; `Null` when it is missing, unreadable or not JSON (a lost cache
    /// only costs a re-measure).
    pub fn load(&self) -> Value {
        let Ok(file) = File::open(&self.path) else {
            return Value::Null;
        };
        if file.metadata().map_or(true, |m| m.len() > MAX_BYTES) {
            log::warn!("flashattn: ignoring {}: too large", self.path.display());
            return Value::Null;
        }
        match serde_json::from_reader(std::io::BufReader::new(file)) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("flashattn: ignoring {}: {e}", self.path.display());
                Value::Null
            }
        }
    }

    /// Applies `change` to the file's current content under an exclusive lock and writes the
    /// result back. Failures are logged and otherwise ignored: the cache is an optimisation.
    pub fn update(&self, change: impl FnOnce(&mut Value)) {
        if let Err(e) = self.try_update(change) {
            log::warn!("flashattn: cannot update {}: {e}", self.path.display());
        }
    }

    fn try_update(&self, change: impl FnOnce(&mut Value)) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.with_extension("lock"))?;
        lock.lock()?;
        let mut value = self.load();
        if !value.is_object() {
            value = Value::Object(Default::default());
        }
        change(&mut value);
        let text = serde_json::to_string_pretty(&value).map_err(std::io::Error::other)?;
        // A temporary file of its own beside the target, renamed over it (removed on failure).
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        // Dropping `lock` releases it.
        Ok(())
    }
}

/// Creates `dir` and its parents, readable only by this user where the platform has modes.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}
