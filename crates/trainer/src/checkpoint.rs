//! Checkpoints: what they hold ([`Checkpoint`], one type for saving, resuming and exporting)
//! and how they are written and checked.
//!
//! `<root>/step-00000123/` is written into `<root>/.step-00000123.tmp`, every file fsynced, a
//! `MANIFEST.json` written last, then renamed into place and the root fsynced. A crash at any
//! moment leaves either the previous checkpoints untouched or a `.tmp` folder that is ignored
//! (and removed by the next save); a save that fails (a full disk, say) removes its `.tmp`
//! folder itself.
//!
//! The manifest records each file's length and XXH3-64 checksum, taken from the bytes as they
//! were written ([`Staging`]), so a file damaged later (a flipped bit on a parallel file
//! system, a bad copy between nodes) is caught: resuming verifies the checkpoint it picks
//! ([`verify_in`]), `--resume` / `--resume auto` fall back to the previous valid one with a
//! warning naming the file, an explicit `--resume PATH` is refused, and `longmix verify` checks
//! any checkpoint by hand. Checkpoints written before checksums (lengths only) still resume,
//! with a note.
//!
//! Data-parallel runs write one checkpoint together ([`Team`]): rank 0 makes the staging folder,
//! every rank writes its part (rank 0 the weights, state and config; with ZeRO-1 each rank its
//! optimizer shard), and only when every rank reports success, with its files' checksums, does
//! rank 0 fsync, write the manifest and rename. A rank that fails or dies leaves no visible
//! checkpoint. Verifying on resume splits the files over the ranks.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use longmix_core::checksum::{check_files, write_summed, Algo, Expected, FileSum};
use longmix_core::fsx::fsync_dir;
use longmix_data::LoaderState;
use longmix_model::{Extension, LoadedModel};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};

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

/// The ranks writing (or verifying) one checkpoint together (see the module docs).
pub trait Team {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Whether this rank's optimizer holds only its ZeRO-1 share.
    fn sharded_optimizer(&self) -> bool;
    /// A collective through a phase that may last as long as a disk takes: every rank's `word`,
    /// in rank order, the same list on every rank. `what` names the phase in errors.
    fn gather(&self, word: &str, what: &str) -> Result<Vec<String>>;
}

/// The staging folder of one rank's part of a checkpoint: every file written through it is
/// summed on its way to disk and synced.
pub struct Staging {
    dir: PathBuf,
    files: BTreeMap<String, FileSum>,
}

impl Staging {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Write `tensors` (any device) as the safetensors file `name`.
    pub fn write_tensors(&mut self, name: &str, tensors: &[(String, Tensor)]) -> Result<()> {
        let sum = longmix_model::write_safetensors(&self.path(name), tensors, None, None, CHECKSUM)?;
        self.files.insert(name.into(), sum);
        Ok(())
    }

    /// Write `bytes` as the file `name`.
    pub fn write_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let sum = write_summed(&self.path(name), CHECKSUM, |w| Ok(w.write_all(bytes)?))?;
        self.files.insert(name.into(), sum);
        Ok(())
    }
}

/// The checksum of checkpoint files (see `longmix_core::checksum` for the choice).
pub const CHECKSUM: Algo = Algo::Xxh3;

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
                d.write_tensors(&files::optimizer_shard(rank, world), &opt.state().0)?;
            }
            if rank != 0 {
                return Ok(());
            }
            d.write_tensors(files::MODEL, &lm.vs.variables().into_iter().collect::<Vec<_>>())?;
            let (tensors, mut meta) = opt.state();
            if sharded {
                meta["shards"] = json!(world);
            } else {
                d.write_tensors(files::OPTIMIZER, &tensors)?;
            }
            d.write_bytes(files::OPTIMIZER_META, serde_json::to_string_pretty(&meta)?.as_bytes())?;
            d.write_bytes(files::STATE, serde_json::to_string_pretty(state)?.as_bytes())?;
            d.write_bytes(files::CONFIG, toml::to_string(cfg)?.as_bytes())
        })
    }

    /// Open the checkpoint in `dir` after verifying every file against its manifest.
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        verify(dir).with_context(|| format!("{} is not a complete, intact checkpoint", dir.display()))?;
        Self::open_verified(dir)
    }

    /// Open the checkpoint in `dir`, which [`verify_in`] has just passed.
    pub fn open_verified(dir: &Path) -> Result<Checkpoint> {
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

/// What a rank reports at the end of each phase of a save: whether its part succeeded, and the
/// files it wrote with their sums.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PhaseReport {
    ok: bool,
    files: BTreeMap<String, FileSum>,
}

/// Write checkpoint `step` under `root`: `fill` writes this rank's files into the [`Staging`]
/// folder it is given; `bytes` is the expected size (for the message when the disk fills up).
/// Returns the final folder. On failure, on any rank, nothing of this save is left behind and
/// every rank returns an error.
pub fn save(
    root: &Path,
    step: u64,
    bytes: u64,
    team: Option<&dyn Team>,
    fill: impl FnOnce(&mut Staging) -> Result<()>,
) -> Result<PathBuf> {
    let lead = team.is_none_or(|t| t.rank() == 0);
    let tmp = root.join(format!(".{}.tmp", dir_name(step)));
    // Each phase ends with every rank learning whether any rank failed it, and which files
    // every rank wrote.
    let agree = |r: Result<()>, files: BTreeMap<String, FileSum>, what: &str| -> Result<BTreeMap<String, FileSum>> {
        let Some(t) = team else { return r.map(|()| files) };
        let report = serde_json::to_string(&PhaseReport { ok: r.is_ok(), files })?;
        let reports = t.gather(&report, &format!("checkpoint of step {step}"))?;
        let reports: Vec<PhaseReport> = reports.iter().map(|w| serde_json::from_str(w).unwrap_or_default()).collect();
        let failed: Vec<usize> = reports.iter().enumerate().filter(|(_, p)| !p.ok).map(|(r, _)| r).collect();
        match r {
            Err(e) => Err(e),
            Ok(()) if failed.is_empty() => Ok(reports.into_iter().flat_map(|p| p.files).collect()),
            Ok(()) => bail!(
                "checkpoint step {step}: rank(s) {failed:?} could not {what}; it was not published and the previous \
                 checkpoints are intact (see the log of those ranks)"
            ),
        }
    };
    let prepared = if lead { prepare(root, &tmp) } else { Ok(()) };
    agree(prepared, BTreeMap::new(), "prepare the staging folder")?;
    let mut staging = Staging { dir: tmp.clone(), files: BTreeMap::new() };
    let filled = fill(&mut staging);
    let written = agree(filled, std::mem::take(&mut staging.files), "write their part");
    let sealed =
        written.and_then(|files| if lead { seal(root, &tmp, step, &files) } else { Ok(root.join(dir_name(step))) });
    let sealed = match sealed {
        Ok(dst) => agree(Ok(()), BTreeMap::new(), "publish").map(|_| dst),
        Err(e) => {
            if lead {
                let _ = fs::remove_dir_all(&tmp);
            }
            // The publish phase's agreement, from this side: every rank takes part in it,
            // whether its own phase failed or the lead's seal did.
            let _ = agree(Err(anyhow::anyhow!("failed")), BTreeMap::new(), "publish");
            Err(e)
        }
    };
    sealed.map_err(|e| save_error(root, step, bytes, e))
}

/// A failed save's error: a full disk says how much was needed and what to do.
fn save_error(root: &Path, step: u64, bytes: u64, e: anyhow::Error) -> anyhow::Error {
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

/// fsync every file of the filled `tmp`, write the manifest of `files`, rename into place.
fn seal(root: &Path, tmp: &Path, step: u64, files: &BTreeMap<String, FileSum>) -> Result<PathBuf> {
    write_manifest(tmp, step, files)?;
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

/// fsync every file of `tmp` (whichever rank wrote it; each must be one of `files`), then write
/// the manifest.
fn write_manifest(tmp: &Path, step: u64, files: &BTreeMap<String, FileSum>) -> Result<()> {
    for entry in fs::read_dir(tmp)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !files.contains_key(&name) {
            bail!("{name} was written into the checkpoint without a checksum (a bug: write it through Staging)");
        }
        File::open(entry.path())?.sync_all()?;
    }
    let manifest = json!({ "step": step, "checksum": CHECKSUM.name(), "files": files });
    let mpath = tmp.join(MANIFEST);
    fs::write(&mpath, serde_json::to_string_pretty(&manifest)?)?;
    File::open(&mpath)?.sync_all()?;
    fsync_dir(tmp)
}

/// A checkpoint's `MANIFEST.json`: its step and files, with the checksum algorithm (None for a
/// checkpoint written before checksums, whose manifest holds lengths only).
pub struct Manifest {
    pub step: u64,
    pub checksum: Option<Algo>,
    pub files: Vec<Expected>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path).with_context(|| format!("{} has no {MANIFEST}", dir.display()))?;
        let m: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let step = m["step"].as_u64().with_context(|| format!("{} lacks \"step\"", path.display()))?;
        let checksum = m["checksum"].as_str().map(Algo::from_name).transpose()?;
        let entries = m["files"].as_object().with_context(|| format!("{} lacks \"files\"", path.display()))?;
        let mut files = Vec::with_capacity(entries.len());
        for (name, v) in entries {
            // Old manifests: `"name": length`; now `"name": {"bytes": length, "hash": hex}`.
            let (bytes, hash) = match v.as_u64() {
                Some(b) => (Some(b), None),
                None => {
                    let sum: FileSum = serde_json::from_value(v.clone()).with_context(|| {
                        format!("{}: the entry of {name} is not a length and checksum", path.display())
                    })?;
                    (Some(sum.bytes), Some(sum.hash))
                }
            };
            files.push(Expected { name: name.clone(), bytes, hash });
        }
        Ok(Manifest { step, checksum, files })
    }
}

/// Check `dir` against its manifest: the length of every file, and the checksums of this rank's
/// share of them (file `i` is rank `i % world`'s), on a few threads. The error names every
/// damaged file, what was found and what was recorded. Returns the manifest.
fn verify_share(dir: &Path, rank: usize, world: usize) -> Result<Manifest> {
    let m = Manifest::read(dir)?;
    let share: Vec<Expected> = m
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| Expected { hash: if i % world == rank { f.hash.clone() } else { None }, ..f.clone() })
        .collect();
    let algo = m.checksum.unwrap_or(CHECKSUM);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let bad: Vec<String> = check_files(dir, &share, algo, threads, &|_| {})
        .iter()
        .zip(&share)
        .filter(|(v, _)| !v.is_ok())
        .map(|(v, f)| v.describe(&f.name, algo))
        .collect();
    if !bad.is_empty() {
        bail!("{}", bad.join("; "));
    }
    Ok(m)
}

/// Check every file of the checkpoint `dir` against its manifest (one process, see
/// [`verify_in`]); returns its step.
pub fn verify(dir: &Path) -> Result<u64> {
    verify_in(dir, None)
}

/// Check the checkpoint `dir` against its manifest, the files' checksums split over the ranks
/// of `team`; every rank gets the same verdict. A checkpoint without checksums passes on its
/// lengths, with a note in the log. Returns its step.
pub fn verify_in(dir: &Path, team: Option<&dyn Team>) -> Result<u64> {
    let (rank, world) = team.map_or((0, 1), |t| (t.rank(), t.world()));
    let mine = verify_share(dir, rank, world);
    let verdict = match team {
        None => mine,
        Some(t) => {
            let word = mine.as_ref().map_or_else(|e| format!("{e:#}"), |_| "ok".into());
            let words = t.gather(&word, &format!("verification of {}", dir.display()))?;
            let bad: Vec<&str> = words.iter().map(String::as_str).filter(|w| *w != "ok").collect();
            if bad.is_empty() {
                mine
            } else {
                Err(anyhow::anyhow!("{}", bad.join("; ")))
            }
        }
    };
    let m = verdict?;
    if m.checksum.is_none() {
        tracing::info!(
            "{} was written without checksums (by an earlier longmix): only its file lengths were checked",
            dir.display()
        );
    }
    Ok(m.step)
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

/// The newest checkpoint under `root` (older than `before`, when given) that verifies with
/// `team`; each damaged or incomplete one on the way is skipped with a warning naming it.
pub fn latest_valid(root: &Path, before: Option<u64>, team: Option<&dyn Team>) -> Result<Option<PathBuf>> {
    for (step, dir) in list(root).into_iter().rev() {
        if before.is_some_and(|b| step >= b) {
            continue;
        }
        match verify_in(&dir, team) {
            Ok(_) => return Ok(Some(dir)),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e:#}", dir.display()),
        }
    }
    Ok(None)
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

    fn write(dir: &mut Staging, name: &str, bytes: &[u8]) -> Result<()> {
        dir.write_bytes(name, bytes)
    }

    /// Flip one bit of `file`, `at` bytes in.
    fn flip(file: &Path, at: usize) {
        let mut bytes = fs::read(file).unwrap();
        bytes[at] ^= 0x04;
        fs::write(file, bytes).unwrap();
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
        assert_eq!(latest_valid(root.path(), None, None).unwrap().unwrap(), root.path().join("step-00000001"));
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
        assert_eq!(latest_valid(root.path(), None, None).unwrap().unwrap(), root.path().join("step-00000001"));
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
        assert!(verify(&two).unwrap_err().to_string().contains("w.bin: 5 bytes, 9 recorded"));
        assert_eq!(latest_valid(root.path(), None, None).unwrap().unwrap(), root.path().join("step-00000001"));
    }

    #[test]
    fn a_flipped_bit_is_named_and_the_previous_checkpoint_is_taken() {
        let root = tempfile::tempdir().unwrap();
        save(root.path(), 1, 4, None, |d| write(d, "w.bin", b"good")).unwrap();
        let two = save(root.path(), 2, 9, None, |d| {
            write(d, "w.bin", b"also good")?;
            write(d, "state.json", b"{}")
        })
        .unwrap();
        let m = Manifest::read(&two).unwrap();
        assert_eq!((m.step, m.checksum), (2, Some(CHECKSUM)));
        assert!(m.files.iter().all(|f| f.hash.as_ref().is_some_and(|h| h.len() == 16)));
        flip(&two.join("w.bin"), 3);
        let e = format!("{:#}", verify(&two).unwrap_err());
        assert!(e.contains("w.bin: xxh3-64 checksum is") && e.contains("recorded") && !e.contains("state.json"), "{e}");
        assert_eq!(latest_valid(root.path(), None, None).unwrap().unwrap(), root.path().join("step-00000001"));
        // Each rank of a team checks its share of the files; their lengths are checked by all.
        assert!(verify_share(&two, 1, 2).is_ok() != verify_share(&two, 0, 2).is_ok());
    }

    #[test]
    fn a_checkpoint_written_before_checksums_still_verifies_on_its_lengths() {
        let root = tempfile::tempdir().unwrap();
        let dir = save(root.path(), 5, 4, None, |d| write(d, "w.bin", b"good")).unwrap();
        fs::write(dir.join(MANIFEST), r#"{ "step": 5, "files": { "w.bin": 4 } }"#).unwrap();
        flip(&dir.join("w.bin"), 0);
        assert_eq!(verify(&dir).unwrap(), 5, "lengths only: the flip cannot be seen");
        fs::write(dir.join("w.bin"), b"longer").unwrap();
        assert!(format!("{:#}", verify(&dir).unwrap_err()).contains("w.bin: 6 bytes, 4 recorded"));
    }

    #[test]
    fn a_file_written_around_the_staging_folder_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let e = save(root.path(), 1, 4, None, |d| Ok(fs::write(d.path("stray.bin"), b"x")?)).unwrap_err();
        assert!(format!("{e:#}").contains("stray.bin was written into the checkpoint without a checksum"), "{e:#}");
        assert!(list(root.path()).is_empty());
    }
}
