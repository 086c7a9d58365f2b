//! Atomic checkpoints: `<root>/step-00000123/`, written into `<root>/.step-00000123.tmp`,
//! every file fsynced, a `MANIFEST.json` (file sizes) written last, then renamed into place and
//! the root fsynced. A crash at any moment leaves either the previous checkpoints untouched or
//! a `.tmp` folder that is ignored (and removed by the next save). On resume, a checkpoint whose
//! files do not match its manifest is skipped with a warning naming it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

pub const MANIFEST: &str = "MANIFEST.json";

fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Write checkpoint `step` under `root`: `fill` writes its files into the folder it is given.
/// Returns the final folder.
pub fn save(root: &Path, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    fs::create_dir_all(root).with_context(|| format!("cannot create checkpoint folder {}", root.display()))?;
    let tmp = root.join(format!(".{}.tmp", dir_name(step)));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp)?;
    fill(&tmp)?;
    let mut files = serde_json::Map::new();
    let mut names: Vec<_> = fs::read_dir(&tmp)?.collect::<std::io::Result<Vec<_>>>()?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let path = entry.path();
        File::open(&path)?.sync_all()?;
        files.insert(entry.file_name().to_string_lossy().into_owned(), json!(entry.metadata()?.len()));
    }
    let manifest = json!({ "step": step, "files": files });
    let mpath = tmp.join(MANIFEST);
    fs::write(&mpath, serde_json::to_string_pretty(&manifest)?)?;
    File::open(&mpath)?.sync_all()?;
    fsync_dir(&tmp)?;
    let dst = root.join(dir_name(step));
    if dst.exists() {
        // Re-saving a step (e.g. a signal right after a periodic save): replace it atomically
        // enough — the old copy is only removed once the new one is complete.
        let old = root.join(format!(".{}.old", dir_name(step)));
        fs::rename(&dst, &old)?;
        fs::rename(&tmp, &dst)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&tmp, &dst)?;
    }
    fsync_dir(root)?;
    Ok(dst)
}

/// Check `dir` against its manifest; the error says what is wrong.
pub fn verify(dir: &Path) -> Result<u64> {
    let text = fs::read_to_string(dir.join(MANIFEST)).with_context(|| format!("{} has no {MANIFEST}", dir.display()))?;
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
            save(root.path(), step, |d| write(d, "w.bin", &[step as u8; 16])).unwrap();
        }
        assert_eq!(list(root.path()).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![10, 20, 30]);
        prune(root.path(), 2).unwrap();
        assert_eq!(list(root.path()).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![20, 30]);
        assert_eq!(verify(&root.path().join("step-00000030")).unwrap(), 30);
    }

    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint_as_latest() {
        let root = tempfile::tempdir().unwrap();
        save(root.path(), 1, |d| write(d, "w.bin", b"good")).unwrap();
        let err = save(root.path(), 2, |d| {
            write(d, "w.bin", b"half")?;
            bail!("killed mid-save")
        });
        assert!(err.is_err());
        assert_eq!(latest_valid(root.path()).unwrap(), root.path().join("step-00000001"));
    }

    #[test]
    fn a_truncated_checkpoint_is_skipped() {
        let root = tempfile::tempdir().unwrap();
        save(root.path(), 1, |d| write(d, "w.bin", b"good")).unwrap();
        let two = save(root.path(), 2, |d| write(d, "w.bin", b"also good")).unwrap();
        fs::write(two.join("w.bin"), b"trunc").unwrap();
        assert!(verify(&two).unwrap_err().to_string().contains("w.bin is 5 bytes"));
        assert_eq!(latest_valid(root.path()).unwrap(), root.path().join("step-00000001"));
    }
}
