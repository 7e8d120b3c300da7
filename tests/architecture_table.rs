//! docs/ARCHITECTURE.md's "Where each feature lives" table stays true: every file and every
//! identifier it names in backticks exists in the sources.

use std::path::{Path, PathBuf};

const SOURCE_DIRS: [&str; 5] = ["core", "backends", "shaders", "src", "integrations"];
const SOURCE_EXTS: [&str; 4] = ["rs", "wgsl", "cu", "cuh"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                sources(&p, out);
            }
        } else if p
            .extension()
            .is_some_and(|x| SOURCE_EXTS.iter().any(|s| x == *s))
        {
            out.push(p);
        }
    }
}

/// The names in a table cell's backticks: `a.rs: f, g (h)` gives a.rs, f, g, h.
fn names(cell_code: &str) -> impl Iterator<Item = &str> {
    cell_code
        .split(|c: char| c.is_whitespace() || ",()".contains(c))
        .map(|w| w.trim_matches(':'))
        .map(|w| w.rsplit("::").next().unwrap_or(w))
        .filter(|w| {
            w.len() > 2
                && w.starts_with(|c: char| c.is_ascii_alphabetic())
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./".contains(c))
        })
}

#[test]
fn every_name_in_the_feature_table_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let start = doc
        .find("### Where each feature lives")
        .expect("the table's heading");
    let table: Vec<&str> = doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .collect();
    assert!(table.len() > 10, "table not found");
    let mut files = Vec::new();
    for d in SOURCE_DIRS {
        sources(&root.join(d), &mut files);
    }
    let texts: Vec<(String, String)> = files
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(p).unwrap_or_default())
        })
        .collect();
    let mut missing = Vec::new();
    for row in &table {
        for code in row.split('`').skip(1).step_by(2) {
            for name in names(code) {
                let found = if let Some(file) = name
                    .rsplit('/')
                    .next()
                    .filter(|f| SOURCE_EXTS.iter().any(|x| f.ends_with(&format!(".{x}"))))
                {
                    texts.iter().any(|(n, _)| n == file)
                } else if name.contains('.') || name.contains('/') {
                    true // paths such as backends/cpu/README.md, field accesses
                } else {
                    texts.iter().any(|(_, t)| {
                        t.match_indices(name).any(|(i, _)| {
                            let before = t[..i].chars().next_back();
                            let after = t[i + name.len()..].chars().next();
                            let word = |c: Option<char>| {
                                c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                            };
                            !word(before) && !word(after)
                        })
                    })
                };
                if !found {
                    missing.push(format!("{name} (row: {})", &row[..row.len().min(60)]));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the sources:\n{}",
        missing.join("\n")
    );
}
