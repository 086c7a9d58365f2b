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
    /// already holds checkpoints is refused, so a run never overwrites another by accident.
    pub fn resume_point(&self, arg: Option<&str>) -> Result<Option<Checkpoint>> {
        let dir = match arg {
            None => {
                if !checkpoint::list(&self.cfg.dir).is_empty() {
                    bail!(
                        "{} already holds checkpoints: pass --resume to continue that run, or set checkpoint.dir to a \
                         new folder",
                        self.cfg.dir.display()
                    );
                }
                None
            }
            Some("auto") => checkpoint::latest_valid(&self.cfg.dir),
            Some("latest") => Some(checkpoint::latest_valid(&self.cfg.dir).with_context(|| {
                format!("--resume: no valid checkpoint under {}; start without --resume", self.cfg.dir.display())
            })?),
            Some(named) => {
                let dir = PathBuf::from(named);
                checkpoint::verify(&dir)
                    .with_context(|| format!("--resume {}: not a complete checkpoint", dir.display()))?;
                Some(dir)
            }
        };
        dir.map(|d| Checkpoint::load(&d)).transpose()
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
