//! The checkpointer of a run: when to save (every `checkpoint.every` steps, on a stop, at the
//! end), what `--resume` names, the disk-space warning, and the team save (every rank writes its
//! part, then the newest `checkpoint.keep` are kept). The files themselves are `checkpoint.rs`'s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Kind;

use crate::checkpoint::{self, Checkpoint, Team, TrainerState};
use crate::config::{CheckpointSection, TrainConfig};
use crate::optim::AdamW;
use longmix_model::LoadedModel;

pub struct Checkpointer {
    cfg: CheckpointSection,
}

impl Checkpointer {
    pub fn new(cfg: &CheckpointSection) -> Checkpointer {
        Checkpointer { cfg: cfg.clone() }
    }

    /// The checkpoint to resume from: `--resume` (newest valid), `--resume DIR`, `--resume auto`
    /// (newest valid, or a fresh start when there is none). Without `--resume`, a folder that
    /// already holds checkpoints is refused, so a run never overwrites another by accident. The
    /// checkpoint picked is verified against its manifest's checksums (the ranks of `team`
    /// sharing the reads): a damaged newest one is skipped with a warning naming the file, a
    /// damaged one named by `--resume DIR` is refused with the previous valid one as the fix.
    pub fn resume_point(&self, arg: Option<&str>, team: Option<&dyn Team>) -> Result<Option<Checkpoint>> {
        let root = &self.cfg.dir;
        let dir = match arg {
            None => {
                if !checkpoint::list(root).is_empty() {
                    bail!(
                        "{} already holds checkpoints: pass --resume to continue that run, or set checkpoint.dir to a \
                         new folder",
                        root.display()
                    );
                }
                None
            }
            Some("auto") => checkpoint::latest_valid(root, None, team)?,
            Some("latest") => Some(checkpoint::latest_valid(root, None, team)?.with_context(|| {
                format!("--resume: no valid checkpoint under {}; start without --resume", root.display())
            })?),
            Some(named) => Some(Self::named(Path::new(named), team)?),
        };
        dir.map(|d| Checkpoint::open_verified(&d)).transpose()
    }

    /// `--resume DIR`, verified; the refusal names the newest valid checkpoint before it.
    fn named(dir: &Path, team: Option<&dyn Team>) -> Result<PathBuf> {
        let Err(e) = checkpoint::verify_in(dir, team) else { return Ok(dir.to_path_buf()) };
        let step = dir.file_name().and_then(|n| n.to_str()?.strip_prefix("step-")?.parse().ok());
        let previous = match (dir.parent(), step) {
            (Some(root), Some(step)) => checkpoint::latest_valid(root, Some(step), team)?,
            _ => None,
        };
        let fix = match previous {
            Some(p) => format!("resume from the previous valid checkpoint instead: --resume {}", p.display()),
            None => "no earlier valid checkpoint is there: start without --resume".into(),
        };
        bail!("--resume {}: not a complete, intact checkpoint ({e:#}); {fix}", dir.display())
    }

    /// Whether step `step` of `total` ends with a checkpoint (`stop`: the run stops after it).
    pub fn due(&self, step: u64, total: u64, stop: bool) -> bool {
        stop || step == total || (self.cfg.every > 0 && step.is_multiple_of(self.cfg.every))
    }

    /// Write the checkpoint of `state` (every rank of `team` together) and prune old ones.
    pub fn save(
        &self,
        cfg: &TrainConfig,
        lm: &LoadedModel,
        opt: &AdamW,
        state: &TrainerState,
        team: Option<&dyn Team>,
    ) -> Result<PathBuf> {
        let dir = Checkpoint::save(&self.cfg.dir, cfg, lm, opt, state, team)?;
        if team.is_none_or(|t| t.rank() == 0) {
            checkpoint::prune(&self.cfg.dir, self.cfg.keep)?;
        }
        Ok(dir)
    }

    /// A warning when the folder's file system cannot hold `keep + 1` checkpoints of a model of
    /// `params` parameters computing in `kind`.
    pub fn space_warning(&self, params: u64, kind: Kind) -> Option<String> {
        // The folder may not exist yet: ask the file system of its nearest existing ancestor.
        let dir = self.cfg.dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("."));
        checkpoint::space_warning(dir, Checkpoint::size_for(params, kind), self.cfg.keep)
    }
}
