//! Loading a Hugging Face model folder: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and `tokenizer.json`.
//!
//! Safetensors files are memory-mapped; each tensor is converted to the variable's dtype and
//! device as it is copied in, so f32, bf16 and f16 checkpoints all load into any compute dtype.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use tch::{nn, Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::transformer::CausalLm;

/// A model with the variable store that owns its weights.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub model: CausalLm,
}

/// Load `dir` (config + weights) with parameters of dtype `kind` on `device`.
pub fn load_model(dir: &Path, kind: Kind, device: Device) -> Result<LoadedModel> {
    if !dir.is_dir() {
        bail!(
            "model folder {} does not exist: pass a Hugging Face model folder (config.json + *.safetensors)",
            dir.display()
        );
    }
    let config = ModelConfig::from_dir(dir)?;
    let mut vs = nn::VarStore::new(device);
    let model = CausalLm::new(&vs.root(), config);
    vs.set_kind(kind);
    load_weights(&vs, dir)?;
    Ok(LoadedModel { vs, model })
}

/// The safetensors files of `dir`: the shards named by `model.safetensors.index.json`, else
/// `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            anyhow::anyhow!("{} has no \"weight_map\" object: it is not a safetensors index", index.display())
        })?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{} has no model.safetensors and no model.safetensors.index.json: longmix reads safetensors weights \
         (convert .bin/.pt checkpoints with transformers' save_pretrained(safe_serialization=True))",
        dir.display()
    )
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// Names transformers keeps in some checkpoints that are derived, not learned.
fn is_derived_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Copy every tensor of `dir`'s safetensors files into the matching variable of `vs`.
/// Every variable must be found exactly once, with its exact shape.
pub fn load_weights(vs: &nn::VarStore, dir: &Path) -> Result<()> {
    let vars = vs.variables();
    let mut missing: BTreeSet<String> = vars.keys().cloned().collect();
    let mut unexpected = Vec::new();
    let tied_head_only = !vars.contains_key("lm_head.weight");
    for file in weight_files(dir)? {
        let f = File::open(&file).with_context(|| format!("cannot open weights file {}", file.display()))?;
        // SAFETY: the map is read-only and lives until the end of this iteration; nothing we
        // run truncates the file meanwhile.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", file.display()))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid safetensors file ({e}): the file is corrupt or truncated; re-export or re-copy it",
                file.display()
            )
        })?;
        for (name, view) in st.tensors() {
            let Some(var) = vars.get(&name) else {
                if !(is_derived_buffer(&name) || (tied_head_only && name == "lm_head.weight")) {
                    unexpected.push(name);
                }
                continue;
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                bail!(
                    "shape mismatch for tensor {name} in {}: the file has {shape:?} but the config implies {:?}; \
                     the config.json does not belong to these weights",
                    file.display(),
                    var.size()
                );
            }
            let kind = kind_of(view.dtype()).ok_or_else(|| {
                anyhow::anyhow!(
                    "tensor {name} in {} has dtype {:?}; supported are F32, F16, BF16, F64",
                    file.display(),
                    view.dtype()
                )
            })?;
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)
                .with_context(|| format!("cannot read tensor {name} from {}", file.display()))?;
            tch::no_grad(|| var.shallow_clone().copy_(&src));
            missing.remove(&name);
        }
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        bail!(
            "the weights hold {} tensor(s) the model does not have, e.g. {:?}: the config.json does not match the weights",
            unexpected.len(),
            &unexpected[..unexpected.len().min(5)]
        );
    }
    if !missing.is_empty() {
        let missing: Vec<_> = missing.into_iter().collect();
        bail!(
            "the weights in {} lack {} tensor(s) the model needs, e.g. {:?}",
            dir.display(),
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    Ok(())
}

/// Load `<dir>/tokenizer.json`.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        bail!("{} not found: a model folder needs the Hugging Face tokenizer.json", path.display());
    }
    tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))
}
