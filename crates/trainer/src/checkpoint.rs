//! Checkpoints: what they hold ([`Checkpoint`], one type for saving, resuming and exporting)
//! and how they are written.
//!
//! `<root>/step-00000123/` is written into `<root>/.step-00000123.tmp`, every file fsynced, a
//! `MANIFEST.json` (file sizes) written last, then renamed into place and the root fsynced. A
//! crash at any moment leaves either the previous checkpoints untouched or a `.tmp` folder that
//! is ignored (and removed by the next save); a save that fails (a full disk, say) removes its
//! `.tmp` folder itself. On resume, a checkpoint whose files do not match its manifest is
//! skipped with a warning naming it.
//!
//! Data-parallel runs write one checkpoint together ([`Team`]): rank 0 makes the staging folder,
//! every rank writes its part (rank 0 the weights, state and config; with ZeRO-1 each rank its
//! optimizer shard), and only when every rank reports success does rank 0 fsync, write the
//! manifest and rename. A rank that fails or dies leaves no visible checkpoint.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use longmix_core::fsx::fsync_dir;
use longmix_data::LoaderState;
use longmix_model::{Extension, LoadedModel};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::config::TrainConfig;
use crate::optim::AdamW;

pub const MANIFEST: &str = "MANIFEST.json";

/// The files of a checkpoint folder.
pub mod files {
    /// Weights (float32 masters' values as the model holds them), HF variable names.
    pub const MODEL: &str = "model.safetensors";
    /// AdamW moments (`m.NAME`, `v.NAME`) and masters (`master.NAME`).
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    /// AdamW step count and config.
    pub const OPTIMIZER_META: &str = "optimizer.json";
    /// ZeRO-1: rank `r`'s optimizer state (its parameters' moments and masters).
    pub fn optimizer_shard(rank: usize, world: usize) -> String {
        format!("optimizer-rank-{rank:05}-of-{world:05}.safetensors")
    }
    /// [`super::TrainerState`].
    pub const STATE: &str = "trainer_state.json";
    /// The run's resolved config.
    pub const CONFIG: &str = "config.toml";
}

/// Everything besides weights and optimizer that a checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub tokens_seen: u64,
    pub loader: LoaderState,
    /// The extension the run trains (fixed at the first step, so a resume never re-resolves it).
    pub rope: Extension,
}

/// A complete checkpoint: the folder, the run's config and the trainer state. Weights and
/// optimizer state are read on demand ([`Checkpoint::load_weights`], [`Checkpoint::load_optimizer`]).
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: TrainConfig,
    pub state: TrainerState,
}

/// The ranks writing one checkpoint together (see the module docs).
pub trait Team {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Whether this rank's optimizer holds only its ZeRO-1 share.
    fn sharded_optimizer(&self) -> bool;
    /// A collective: the ranks whose `ok` was false, the same list on every rank.
    fn failed(&self, ok: bool, step: u64) -> Result<Vec<usize>>;
}

impl Checkpoint {
    /// Write checkpoint `state.step` of `lm` and `opt` under `root`; returns its folder. With a
    /// `team`, every rank calls this at the same step.
    pub fn save(
        root: &Path,
        cfg: &TrainConfig,
        lm: &LoadedModel,
        opt: &AdamW,
        state: &TrainerState,
        team: Option<&dyn Team>,
    ) -> Result<PathBuf> {
        let params = lm.vs.variables().values().map(|t| t.numel() as u64).sum();
        let bytes = Self::size_for(params, lm.model.lm_head_weight().kind());
        let (rank, world, sharded) = team.map_or((0, 1, false), |t| (t.rank(), t.world(), t.sharded_optimizer()));
        save(root, state.step, bytes, team, |d| {
            if sharded {
                let (tensors, _) = opt.state();
                Tensor::write_safetensors(&tensors, d.join(files::optimizer_shard(rank, world)))?;
            }
            if rank != 0 {
                return Ok(());
            }
            let named: Vec<(String, Tensor)> =
                lm.vs.variables().into_iter().map(|(k, v)| (k, v.detach().to_device(Device::Cpu))).collect();
            Tensor::write_safetensors(&named, d.join(files::MODEL))?;
            let (tensors, mut meta) = opt.state();
            if sharded {
                meta["shards"] = json!(world);
            } else {
                Tensor::write_safetensors(&tensors, d.join(files::OPTIMIZER))?;
            }
            fs::write(d.join(files::OPTIMIZER_META), serde_json::to_string_pretty(&meta)?)?;
            fs::write(d.join(files::STATE), serde_json::to_string_pretty(state)?)?;
            fs::write(d.join(files::CONFIG), toml::to_string(cfg)?)?;
            Ok(())
        })
    }

    /// Open the checkpoint in `dir`: its manifest must verify.
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        verify(dir).with_context(|| format!("{} is not a complete checkpoint", dir.display()))?;
        let config = TrainConfig::read(&dir.join(files::CONFIG))?;
        let path = dir.join(files::STATE);
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let state =
            serde_json::from_str(&text).with_context(|| format!("{} is not a trainer state", path.display()))?;
        Ok(Checkpoint { dir: dir.to_path_buf(), config, state })
    }

    /// Copy the checkpoint's weights into `lm` (whose extension must already be applied).
    pub fn load_weights(&self, lm: &LoadedModel) -> Result<()> {
        longmix_model::load::load_weights(&lm.vs, &self.dir)
    }

    /// Restore `opt`'s parameters' state: from the whole-optimizer file, or from the ZeRO-1
    /// shards of any world size (each shard holds whole parameters, so a rank keeps what it
    /// owns now, whoever owned it before).
    pub fn load_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        let whole = self.dir.join(files::OPTIMIZER);
        let paths = if whole.exists() {
            vec![whole]
        } else {
            let mut shards: Vec<PathBuf> = fs::read_dir(&self.dir)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("optimizer-rank-")))
                .collect();
            shards.sort();
            if shards.is_empty() {
                bail!("{} holds neither {} nor optimizer shards", self.dir.display(), files::OPTIMIZER);
            }
            shards
        };
        let wanted: std::collections::BTreeSet<&str> = opt.names().collect();
        let keep = |key: &str| key.split_once('.').is_some_and(|(_, name)| wanted.contains(name));
        let mut saved = BTreeMap::new();
        for path in &paths {
            let tensors = Tensor::read_safetensors(path)
                .with_context(|| format!("cannot read optimizer state {}", path.display()))?;
            saved.extend(tensors.into_iter().filter(|(k, _)| keep(k)));
        }
        let path = &paths[0];
        let meta_path = self.dir.join(files::OPTIMIZER_META);
        let meta: serde_json::Value = serde_json::from_str(&fs::read_to_string(&meta_path)?)
            .with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
        opt.load_state(&saved, &meta).with_context(|| format!("optimizer state {}", path.display()))
    }

    /// The bytes of a checkpoint of `params` parameters computing in `kind`: the weights in
    /// `kind`, two float32 moments, and float32 masters unless `kind` is float32 (the small
    /// JSON/TOML files left out).
    pub fn size_for(params: u64, kind: Kind) -> u64 {
        let masters = if kind == Kind::Float { 0 } else { 4 };
        params * (kind.elt_size_in_bytes() as u64 + 8 + masters)
    }
}

fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Free bytes for an unprivileged writer on the file system holding `path` (None where unknown).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// A warning when `root`'s file system has less free space than `keep + 1` checkpoints of
/// `bytes` each need (the kept ones plus the one being written); None when it has enough.
pub fn space_warning(root: &Path, bytes: u64, keep: usize) -> Option<String> {
    let free = free_bytes(root)?;
    let copies = if keep == 0 { 1 } else { keep as u64 + 1 };
    let need = bytes.saturating_mul(copies);
    (free < need).then(|| {
        format!(
            "{} has {} free, but {copies} checkpoint(s) of about {} each need {}: free space, lower checkpoint.keep, or point checkpoint.dir elsewhere",
            root.display(),
            gb(free),
            gb(bytes),
            gb(need)
        )
    })
}

/// Whether `e` comes from a full disk.
fn is_disk_full(e: &anyhow::Error) -> bool {
    let io_full =
        e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC)));
    let text = format!("{e:#}");
    io_full || text.contains("StorageFull") || text.contains("No space left on device")
}

/// Write checkpoint `step` under `root`: `fill` writes this rank's files into the folder it is
/// given; `bytes` is the expected size (for the message when the disk fills up). Returns the
/// final folder. On failure, on any rank, nothing of this save is left behind and every rank
/// returns an error.
pub fn save(
    root: &Path,
    step: u64,
    bytes: u64,
    team: Option<&dyn Team>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let lead = team.is_none_or(|t| t.rank() == 0);
    let tmp = root.join(format!(".{}.tmp", dir_name(step)));
    // Each phase ends with every rank learning whether any rank failed it.
    let agree = |r: Result<()>, what: &str| -> Result<()> {
        let Some(t) = team else { return r };
        let failed = t.failed(r.is_ok(), step)?;
        match r {
            Err(e) => Err(e),
            Ok(()) if failed.is_empty() => Ok(()),
            Ok(()) => bail!(
                "checkpoint step {step}: rank(s) {failed:?} could not {what}; it was not published and the previous \
                 checkpoints are intact (see the log of those ranks)"
            ),
        }
    };
    let prepared = if lead { prepare(root, &tmp) } else { Ok(()) };
    agree(prepared, "prepare the staging folder")?;
    let written = agree(fill(&tmp), "write their part");
    let sealed = written.and_then(|()| if lead { seal(root, &tmp, step) } else { Ok(root.join(dir_name(step))) });
    let sealed = match sealed {
        Ok(dst) => agree(Ok(()), "publish").map(|()| dst),
        Err(e) => {
            if lead {
                let _ = fs::remove_dir_all(&tmp);
            }
            // The publish phase's agreement, from this side: every rank takes part in it,
            // whether its own phase failed or the lead's seal did.
            let _ = team.map(|t| t.failed(false, step));
            Err(e)
        }
    };
    sealed.map_err(|e| {
        if !is_disk_full(&e) {
            return e.context(format!(
                "cannot save checkpoint step {step} in {}; the partial checkpoint was removed",
                root.display()
            ));
        }
        let free = free_bytes(root).map_or("unknown".into(), gb);
        anyhow::anyhow!(
            "cannot save checkpoint step {step} in {}: the disk is full (the checkpoint needs about {}, {free} is \
             free); the partial checkpoint was removed and the previous ones are intact. Free space, lower \
             checkpoint.keep, or point checkpoint.dir elsewhere, then resume with --resume ({e:#})",
            root.display(),
            gb(bytes),
        )
    })
}

/// Make an empty staging folder (a stale one from a crash is removed first).
fn prepare(root: &Path, tmp: &Path) -> Result<()> {
    fs::create_dir_all(root).with_context(|| format!("cannot create checkpoint folder {}", root.display()))?;
    if tmp.exists() {
        fs::remove_dir_all(tmp)?;
    }
    fs::create_dir(tmp)?;
    Ok(())
}

/// fsync every file of the filled `tmp`, write the manifest, rename into place.
fn seal(root: &Path, tmp: &Path, step: u64) -> Result<PathBuf> {
    write_manifest(tmp, step)?;
    let dst = root.join(dir_name(step));
    if dst.exists() {
        // Re-saving a step (e.g. a signal right after a periodic save): the old copy is only
        // removed once the new one is complete.
        let old = root.join(format!(".{}.old", dir_name(step)));
        fs::rename(&dst, &old)?;
        fs::rename(tmp, &dst)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(tmp, &dst)?;
    }
    fsync_dir(root)?;
    Ok(dst)
}

/// fsync every file of `tmp` (whichever rank wrote it), then write the manifest.
fn write_manifest(tmp: &Path, step: u64) -> Result<()> {
    let mut files = serde_json::Map::new();
    let mut names: Vec<_> = fs::read_dir(tmp)?.collect::<std::io::Result<Vec<_>>>()?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        File::open(entry.path())?.sync_all()?;
        files.insert(entry.file_name().to_string_lossy().into_owned(), json!(entry.metadata()?.len()));
    }
    let manifest = json!({ "step": step, "files": files });
    let mpath = tmp.join(MANIFEST);
    fs::write(&mpath, serde_json::to_string_pretty(&manifest)?)?;
    File::open(&mpath)?.sync_all()?;
    fsync_dir(tmp)
}

/// Check `dir` against its manifest; the error says what is wrong.
pub fn verify(dir: &Path) -> Result<u64> {
    let text =
        fs::read_to_string(dir.join(MANIFEST)).with_context(|| format!("{} has no {MANIFEST}", dir.display()))?;
    let m: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{MANIFEST} is not valid JSON"))?;
    let files = m["files"].as_object().context("manifest lacks \"files\"")?;
    for (name, size) in files {
        let actual = fs::metadata(dir.join(name)).map(|md| md.len()).ok();
        if actual != size.as_u64() {
            bail!("{name} is {} bytes, the manifest says {size}", actual.map_or("missing".into(), |a| a.to_string()));
        }
    }
    m["step"].as_u64().context("manifest lacks \"step\"")
}

/// Complete checkpoint folders under `root`, oldest first (by step).
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest checkpoint under `root` that verifies; broken ones are skipped with a warning.
pub fn latest_valid(root: &Path) -> Option<PathBuf> {
    for (_, dir) in list(root).into_iter().rev() {
        match verify(&dir) {
            Ok(_) => return Some(dir),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e:#}", dir.display()),
        }
    }
    None
}

/// Keep the newest `keep` checkpoints (0 keeps all).
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root);
    if keep == 0 || all.len() <= keep {
        return Ok(());
    }
    for (_, dir) in &all[..all.len() - keep] {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        fs::write(dir.join(name), bytes)?;
        Ok(())
    }

    #[test]
    fn save_list_verify_prune() {
        let root = tempfile::tempdir().unwrap();
        for step in [10, 20, 30] {
            save(root.path(), step, 16, None, |d| write(d, "w.bin", &[step as u8; 16])).unwrap();
        }
        assert_eq!(list(root.path()).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![10, 20, 30]);
        prune(root.path(), 2).unwrap();
        assert_eq!(list(root.path()).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![20, 30]);
        assert_eq!(verify(&root.path().join("step-00000030")).unwrap(), 30);
    }

    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint_as_latest() {
        let root = tempfile::tempdir().unwrap();
        save(root.path(), 1, 4, None, |d| write(d, "w.bin", b"good")).unwrap();
        let err = save(root.path(), 2, 4, None, |d| {
            write(d, "w.bin", b"half")?;
            bail!("killed mid-save")
        });
        assert!(err.is_err());
        assert_eq!(latest_valid(root.path()).unwrap(), root.path().join("step-00000001"));
        let left: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("step-00000001")], "the failed save's .tmp folder is gone");
    }

    #[test]
    fn a_full_disk_is_named_and_cleaned_up() {
        let root = tempfile::tempdir().unwrap();
        save(root.path(), 1, 4, None, |d| write(d, "w.bin", b"good")).unwrap();
        let e = save(root.path(), 2, 7_000_000_000, None, |d| {
            write(d, "w.bin", b"partial")?;
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC)).context("writing w.bin")
        })
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("the disk is full") && msg.contains("7.00 GB") && msg.contains("free"), "{msg}");
        assert!(msg.contains("checkpoint.keep") && msg.contains("--resume"), "{msg}");
        assert!(!root.path().join(".step-00000002.tmp").exists());
        assert_eq!(latest_valid(root.path()).unwrap(), root.path().join("step-00000001"));
    }

    #[test]
    fn too_little_space_for_the_kept_checkpoints_is_warned() {
        let root = tempfile::tempdir().unwrap();
        let free = free_bytes(root.path()).expect("statvfs works on a temporary folder");
        assert!(space_warning(root.path(), 1, 3).is_none());
        let w = space_warning(root.path(), free / 2, 3).expect("4 copies of half the free space do not fit");
        assert!(w.contains("4 checkpoint(s)") && w.contains("checkpoint.keep"), "{w}");
    }

    #[test]
    fn a_truncated_checkpoint_is_skipped() {
        let root = tempfile::tempdir().unwrap();
        save(root.path(), 1, 4, None, |d| write(d, "w.bin", b"good")).unwrap();
        let two = save(root.path(), 2, 9, None, |d| write(d, "w.bin", b"also good")).unwrap();
        fs::write(two.join("w.bin"), b"trunc").unwrap();
        assert!(verify(&two).unwrap_err().to_string().contains("w.bin is 5 bytes"));
        assert_eq!(latest_valid(root.path()).unwrap(), root.path().join("step-00000001"));
    }
}
