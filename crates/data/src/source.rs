//! Reading raw documents out of the configured sources (before tokenization).
//!
//! * `jsonl`: one JSON object per line; `text_field` is the document; `group_by` joins
//!   consecutive records with equal values of the listed fields. A folder reads its
//!   `.jsonl`/`.json`/`.ndjson` files (recursively, sorted).
//! * `text`: a file is one document; a folder gives one document per non-hidden file,
//!   recursively, in sorted path order.
//! * `parquet`: a `.parquet` file or a folder of them (recursively, sorted); one document per
//!   non-null value of the string column `text_column`.
//! * `tokens`: pre-tokenized; not read here (see [`crate::cache`]).

use crate::config::SourceConfig;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// A file that a source reads, with what identifies its content for the cache key.
#[derive(Clone, Debug)]
pub struct FileInfo {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u128,
}

fn file_info(path: &Path) -> Result<FileInfo> {
    let md = std::fs::metadata(path).with_context(|| format!("reading metadata of {}", path.display()))?;
    let mtime_ns =
        md.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    Ok(FileInfo { path: path.to_path_buf(), size: md.len(), mtime_ns })
}

fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Every non-hidden regular file under `dir`, recursively, sorted by path.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing folder {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing folder {}", dir.display()))?;
    entries.sort();
    for p in entries {
        if is_hidden(&p) {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// The files of source `index` (canonical paths, sorted), with sizes and mtimes.
/// Fails with a message naming `sources[index].path` when the path is missing or empty.
pub fn resolve_files(cfg: &SourceConfig, index: usize) -> Result<Vec<FileInfo>> {
    let path = cfg.path();
    let kind = cfg.kind_name();
    if !path.exists() {
        bail!(
            "data config: sources[{index}].path = \"{}\" ({kind} source) does not exist; fix `path` of that source (relative paths are taken from the working directory)",
            path.display()
        );
    }
    let path = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut files = Vec::new();
    match cfg {
        SourceConfig::Tokens { .. } => {
            if !path.is_file() {
                bail!(
                    "data config: sources[{index}].path = \"{}\" (tokens source) must be a token file (with \"<path>.idx\" beside it), not a folder",
                    path.display()
                );
            }
            let idx = idx_path(&path);
            if !idx.is_file() {
                bail!(
                    "data config: sources[{index}] (tokens source): the index file \"{}\" is missing; write the u64 document offsets there (see the longmix-data docs for the format)",
                    idx.display()
                );
            }
            files.push(path.clone());
            files.push(idx);
        }
        _ if path.is_dir() => {
            let mut all = Vec::new();
            walk(&path, &mut all)?;
            let keep: &[&str] = match cfg {
                SourceConfig::Parquet { .. } => &["parquet"],
                SourceConfig::Jsonl { .. } => &["jsonl", "json", "ndjson"],
                _ => &[],
            };
            if !keep.is_empty() {
                all.retain(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| keep.contains(&e)));
            }
            if all.is_empty() {
                let what = match cfg {
                    SourceConfig::Parquet { .. } => ".parquet files",
                    SourceConfig::Jsonl { .. } => ".jsonl/.json/.ndjson files",
                    _ => "files",
                };
                bail!(
                    "data config: sources[{index}].path = \"{}\" ({kind} source) is a folder without {what}; point `path` at the data",
                    path.display()
                );
            }
            files = all;
        }
        _ => files.push(path.clone()),
    }
    files.iter().map(|p| file_info(p)).collect()
}

/// `<path>.idx`, the document index of a tokens source.
pub fn idx_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".idx");
    PathBuf::from(s)
}

/// Every document of text-bearing source `cfg` (not `tokens`), in the order training reads them.
pub fn documents(cfg: &SourceConfig) -> Result<Vec<String>> {
    if let SourceConfig::Tokens { .. } = cfg {
        bail!("a tokens source holds token ids, not text; give a jsonl, text or parquet source");
    }
    let files = resolve_files(cfg, 0)?;
    let mut docs = Vec::new();
    read_documents(cfg, 0, &files, &mut |text, _| {
        docs.push(text);
        Ok(())
    })?;
    if docs.is_empty() {
        bail!("{} holds no document", cfg.path().display());
    }
    Ok(docs)
}

/// Calls `on_doc(text, bytes_read_so_far)` for every document of a text-bearing source, in
/// order. `bytes_read_so_far` counts input bytes (for progress).
pub fn read_documents(
    cfg: &SourceConfig,
    index: usize,
    files: &[FileInfo],
    on_doc: &mut dyn FnMut(String, u64) -> Result<()>,
) -> Result<()> {
    let mut done_bytes = 0u64;
    for f in files {
        match cfg {
            SourceConfig::Jsonl { text_field, group_by, join, .. } => {
                read_jsonl(&f.path, text_field, group_by.as_deref(), join, done_bytes, on_doc)?
            }
            SourceConfig::Text { .. } => {
                let mut bytes = Vec::with_capacity(f.size as usize);
                std::fs::File::open(&f.path)
                    .and_then(|mut h| h.read_to_end(&mut bytes))
                    .with_context(|| format!("reading {}", f.path.display()))?;
                let text = String::from_utf8(bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "sources[{index}] (text source): {} is not valid UTF-8 (byte {}); convert it to UTF-8 or remove it from the folder",
                        f.path.display(),
                        e.utf8_error().valid_up_to()
                    )
                })?;
                on_doc(text, done_bytes + f.size)?;
            }
            SourceConfig::Parquet { text_column, .. } => {
                read_parquet(&f.path, text_column, index, done_bytes, f.size, on_doc)?
            }
            SourceConfig::Tokens { .. } => unreachable!("tokens sources are not read as text"),
        }
        done_bytes += f.size;
    }
    Ok(())
}

fn read_jsonl(
    path: &Path,
    text_field: &str,
    group_by: Option<&[String]>,
    join: &str,
    base_bytes: u64,
    on_doc: &mut dyn FnMut(String, u64) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    let mut line_no = 0usize;
    let mut read = 0u64;
    // The group being accumulated: its key and text.
    let mut group: Option<(Vec<serde_json::Value>, String)> = None;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .with_context(|| format!("{}:{}: reading line (is the file UTF-8?)", path.display(), line_no + 1))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        read += n as u64;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(trimmed).map_err(|e| {
            anyhow::anyhow!(
                "{}:{line_no}: not valid JSON ({e}); each line of a jsonl source must be one JSON object",
                path.display()
            )
        })?;
        let obj = value.as_object().ok_or_else(|| {
            anyhow::anyhow!("{}:{line_no}: expected a JSON object, found {}", path.display(), kind_of(&value))
        })?;
        let text = match obj.get(text_field) {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(other) => bail!(
                "{}:{line_no}: field \"{text_field}\" is {}, not a string; set `text_field` of this jsonl source to the field holding the text",
                path.display(),
                kind_of(other)
            ),
            None => {
                let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
                keys.sort();
                bail!(
                    "{}:{line_no}: no field \"{text_field}\" (fields: {}); set `text_field` of this jsonl source to the field holding the text",
                    path.display(),
                    keys.join(", ")
                )
            }
        };
        match group_by {
            None => on_doc(text.to_string(), base_bytes + read)?,
            Some(fields) => {
                let mut key = Vec::with_capacity(fields.len());
                for f in fields {
                    match obj.get(f) {
                        Some(v) => key.push(v.clone()),
                        None => bail!(
                            "{}:{line_no}: no field \"{f}\" named in `group_by`; fix `group_by` of this jsonl source or the data",
                            path.display()
                        ),
                    }
                }
                match &mut group {
                    Some((k, acc)) if *k == key => {
                        acc.push_str(join);
                        acc.push_str(text);
                    }
                    _ => {
                        if let Some((_, acc)) = group.take() {
                            on_doc(acc, base_bytes + read)?;
                        }
                        group = Some((key, text.to_string()));
                    }
                }
            }
        }
    }
    if let Some((_, acc)) = group.take() {
        on_doc(acc, base_bytes + read)?;
    }
    Ok(())
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_parquet(
    path: &Path,
    column: &str,
    index: usize,
    base_bytes: u64,
    size: u64,
    on_doc: &mut dyn FnMut(String, u64) -> Result<()>,
) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::schema::types::Type;
    use std::sync::Arc;

    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema();
    let total_rows = meta.file_metadata().num_rows().max(1) as u64;
    let field = schema.get_fields().iter().find(|f| f.name() == column).cloned().ok_or_else(|| {
        let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
        anyhow::anyhow!(
            "sources[{index}] (parquet source): {} has no column \"{column}\" (columns: {}); set `text_column` to the text column",
            path.display(),
            names.join(", ")
        )
    })?;
    let projection = Type::group_type_builder(schema.name()).with_fields(vec![Arc::clone(&field)]).build()?;
    let rows = reader.get_row_iter(Some(projection))?;
    for (i, row) in rows.enumerate() {
        let row = row.with_context(|| format!("{}: reading row {i}", path.display()))?;
        let progress = base_bytes + size * (i as u64 + 1) / total_rows;
        for (_, value) in row.get_column_iter() {
            match value {
                Field::Str(s) => on_doc(s.clone(), progress)?,
                Field::Bytes(b) => match std::str::from_utf8(b.data()) {
                    Ok(s) => on_doc(s.to_string(), progress)?,
                    Err(_) => bail!("{}: row {i} of column \"{column}\" is not UTF-8 text", path.display()),
                },
                Field::Null => {}
                other => bail!(
                    "sources[{index}] (parquet source): {}: column \"{column}\" holds non-string values (row {i}: {other}); set `text_column` to a string column",
                    path.display()
                ),
            }
        }
    }
    Ok(())
}
