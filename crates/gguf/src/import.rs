//! `import_gguf`: a GGUF LLaMA model in, a Hugging Face model folder out.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::{Dtype, View};
use serde_json::{json, Value as Json};
use tracing::{debug, info};

use crate::dequant::Dequantizer;
use crate::error::{GgufError, Result};
use crate::llama::{unpermute_rows, ExpectedTensor, LlamaParams};
use crate::reader::GgufFile;
use crate::tokenizer::build_tokenizer;

/// The file that marks a folder as written by [`import_gguf`]; only such a folder is replaced.
pub const MARKER_FILE: &str = "longmix_import.json";

/// What [`import_gguf`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    /// `general.architecture` of the GGUF file.
    pub architecture: String,
    /// Tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Parameters written (tied embeddings counted once).
    pub n_params: u64,
    /// The distinct ggml types of the file's tensors, by type id (`["F32", "Q4_1", "Q8_0"]`).
    pub quant_types: Vec<String>,
    pub out_dir: PathBuf,
}

/// Converts the GGUF file `gguf` into a Hugging Face `LlamaForCausalLM` folder at `out_dir`:
/// `config.json`, `generation_config.json`, `model.safetensors` (f32), `tokenizer.json`,
/// `tokenizer_config.json`, and [`MARKER_FILE`] describing the import.
///
/// Everything is checked before anything is written. The folder is built next to `out_dir`
/// (as `.NAME.partial-PID`) and renamed into place, so `out_dir` is never half-written. An
/// existing `out_dir` is replaced only when it is empty or a previous import (it holds
/// [`MARKER_FILE`]); the old import is then moved aside, the new one renamed in, and the old one
/// deleted, so `out_dir` always holds one complete import (it is absent only for the instant
/// between the two renames). Any other existing `out_dir` is an error.
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportReport> {
    let started = Instant::now();
    let file = GgufFile::open(gguf)?;
    info!(
        file = %gguf.display(),
        version = file.version(),
        tensors = file.tensors().len(),
        metadata_keys = file.metadata().len(),
        "reading GGUF"
    );
    let architecture = file.architecture()?.to_string();
    let params = LlamaParams::from_gguf(&file)?;
    let plan = params.plan(&file)?;
    let tensors = plan
        .iter()
        .map(|(expected, info)| Ok(LazyTensor { expected, source: file.dequantizer(info)? }))
        .collect::<Result<Vec<_>>>()?;
    let tokenizer = build_tokenizer(&file, params.context_length)?;
    if tokenizer.n_tokens > params.vocab_size {
        return Err(GgufError::Inconsistent(format!(
            "the tokenizer has {} tokens but the embeddings only {} rows",
            tokenizer.n_tokens, params.vocab_size
        )));
    }
    check_output(out_dir)?;

    let n_params: u64 = tensors.iter().map(|t| t.source.n_elements() as u64).sum();
    let quant_types: Vec<String> =
        file.tensors().iter().map(|t| t.ggml_type).collect::<BTreeSet<_>>().into_iter().map(|t| t.name()).collect();
    info!(
        architecture = %architecture,
        layers = params.n_layers,
        hidden = params.hidden_size,
        tensors = tensors.len(),
        params = n_params,
        types = %quant_types.join(","),
        tied_embeddings = params.tie_word_embeddings,
        "importing"
    );

    let special = &tokenizer.special_ids;
    let source = fs::canonicalize(gguf).unwrap_or_else(|_| gguf.to_path_buf());
    let manifest = json!({
        "generator": concat!("longmix-gguf ", env!("CARGO_PKG_VERSION")),
        "source": source.display().to_string(),
        "source_bytes": fs::metadata(gguf).map(|m| m.len()).ok(),
        "gguf_version": file.version(),
        "architecture": architecture,
        "name": file.get_str("general.name").ok().flatten(),
        "n_tensors": tensors.len(),
        "n_params": n_params,
        "quant_types": quant_types,
    });

    let staging = Staging::create(out_dir)?;
    staging.write_json("config.json", &params.config_json(special))?;
    staging.write_json("generation_config.json", &special.generation_config())?;
    staging.write("tokenizer.json", tokenizer.tokenizer_json.as_bytes())?;
    staging.write_json("tokenizer_config.json", &tokenizer.tokenizer_config)?;

    let write_started = Instant::now();
    let weights = staging.path("model.safetensors");
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.expected.hf_name.as_str(), t)), Some(format), &weights)?;
    sync_file(&weights)?;
    info!(
        seconds = format!("{:.2}", write_started.elapsed().as_secs_f64()),
        bytes = n_params * 4,
        "dequantized and wrote model.safetensors"
    );

    // Written last: a folder holding it is a complete import.
    staging.write_json(MARKER_FILE, &manifest)?;
    staging.commit()?;
    info!(
        out_dir = %out_dir.display(),
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "imported"
    );

    Ok(ImportReport { architecture, n_tensors: tensors.len(), n_params, quant_types, out_dir: out_dir.to_path_buf() })
}

/// A tensor dequantized (and for Q/K un-permuted) only when `safetensors` asks for its bytes, so
/// one tensor at a time is in memory.
struct LazyTensor<'a> {
    expected: &'a ExpectedTensor,
    source: Dequantizer<'a>,
}

impl View for &LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.expected.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let started = Instant::now();
        let mut values = self.source.to_vec();
        if let Some(heads) = self.expected.unpermute_heads {
            let [rows, cols] = self.expected.shape[..] else { unreachable!("Q and K projections are matrices") };
            values = unpermute_rows(&values, rows, cols, heads);
        }
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in &values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        debug!(tensor = %self.expected.hf_name, ms = started.elapsed().as_millis() as u64, "dequantized");
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.source.n_elements() * 4
    }
}

/// What is at the output path now.
enum OutputState {
    Absent,
    EmptyDir,
    PreviousImport,
}

fn check_output(out_dir: &Path) -> Result<OutputState> {
    let meta = match fs::symlink_metadata(out_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OutputState::Absent),
        Err(e) => return Err(GgufError::io("inspect", out_dir, e)),
        Ok(meta) => meta,
    };
    let refuse = || GgufError::OutputExists { path: out_dir.to_path_buf(), marker: MARKER_FILE };
    if !meta.is_dir() {
        return Err(refuse());
    }
    if out_dir.join(MARKER_FILE).is_file() {
        return Ok(OutputState::PreviousImport);
    }
    let mut entries = fs::read_dir(out_dir).map_err(|e| GgufError::io("list", out_dir, e))?;
    if entries.next().is_none() {
        Ok(OutputState::EmptyDir)
    } else {
        Err(refuse())
    }
}

/// A hidden folder next to the output, deleted on drop unless committed.
struct Staging {
    dir: PathBuf,
    out_dir: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(out_dir: &Path) -> Result<Self> {
        let name = out_dir.file_name().ok_or_else(|| {
            GgufError::Unsupported(format!("output path {} does not name a folder", out_dir.display()))
        })?;
        let parent = parent_of(out_dir);
        fs::create_dir_all(&parent).map_err(|e| GgufError::io("create", &parent, e))?;
        let dir = parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
        if dir.exists() {
            // Left by an earlier run that had this process id and was killed.
            fs::remove_dir_all(&dir).map_err(|e| GgufError::io("remove", &dir, e))?;
        }
        fs::create_dir(&dir).map_err(|e| GgufError::io("create", &dir, e))?;
        Ok(Staging { dir, out_dir: out_dir.to_path_buf(), committed: false })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(name);
        let mut file = File::create(&path).map_err(|e| GgufError::io("create", &path, e))?;
        file.write_all(bytes).map_err(|e| GgufError::io("write", &path, e))?;
        file.sync_all().map_err(|e| GgufError::io("sync", &path, e))
    }

    fn write_json(&self, name: &'static str, value: &Json) -> Result<()> {
        let mut text = serde_json::to_string_pretty(value).map_err(|source| GgufError::Json { file: name, source })?;
        text.push('\n');
        self.write(name, text.as_bytes())
    }

    /// Moves the finished folder to the output path (see [`import_gguf`] for the rules).
    fn commit(mut self) -> Result<()> {
        let out = self.out_dir.clone();
        let rename = |from: &Path, to: &Path| fs::rename(from, to).map_err(|e| GgufError::io("rename", from, e));
        match check_output(&out)? {
            OutputState::Absent => rename(&self.dir, &out)?,
            OutputState::EmptyDir => {
                fs::remove_dir(&out).map_err(|e| GgufError::io("replace", &out, e))?;
                rename(&self.dir, &out)?;
            }
            OutputState::PreviousImport => {
                let name = out.file_name().expect("checked in create").to_string_lossy().into_owned();
                let old = parent_of(&out).join(format!(".{name}.old-{}", std::process::id()));
                rename(&out, &old)?;
                if let Err(e) = rename(&self.dir, &out) {
                    // Put the previous import back; the new one is deleted on drop.
                    let _ = fs::rename(&old, &out);
                    return Err(e);
                }
                info!(out_dir = %out.display(), "replaced the previous import");
                if let Err(e) = fs::remove_dir_all(&old) {
                    tracing::warn!(path = %old.display(), error = %e, "could not delete the previous import");
                }
            }
        }
        self.committed = true;
        sync_dir(&parent_of(&out));
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| GgufError::io("sync", path, e))
}

/// Makes a rename durable. Best effort: not every platform can sync a directory.
fn sync_dir(path: &Path) {
    if let Ok(dir) = File::open(path) {
        let _ = dir.sync_all();
    }
}
