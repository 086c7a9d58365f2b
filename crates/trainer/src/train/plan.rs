//! `longmix train --dry-run`: the plan of a run (model, window, steps, memory, checkpoints,
//! and for data parallelism the ranks and their estimated idle time).

use longmix_data::Loader;
use longmix_model::ModelConfig;

use super::Trainer;
use crate::checkpoint::Checkpoint;
use crate::distributed;
use crate::estimate::MemoryEstimate;

impl Trainer {
    /// Estimated mean rank idle fraction over the first `steps` global steps of `loader`'s
    /// rows, balanced and round-robin (from [`distributed::row_cost`]).
    fn idle_estimate(&self, loader: &mut Loader, world: usize, steps: usize) -> (f64, f64) {
        let mut idle = [0.0, 0.0];
        for _ in 0..steps {
            let costs: Vec<f64> = (0..self.cfg.rows_per_step(world))
                .map(|_| distributed::row_cost(&loader.next_row(), &self.lm.model.config))
                .collect();
            for (k, balance) in [true, false].into_iter().enumerate() {
                let loads: Vec<f64> = distributed::assign_rows(&costs, world, balance)
                    .iter()
                    .map(|rows| rows.iter().map(|&i| costs[i]).sum())
                    .collect();
                let max = loads.iter().cloned().fold(0.0, f64::max);
                idle[k] += distributed::idle(&loads).iter().sum::<f64>() / max / world as f64 / steps as f64;
            }
        }
        (idle[0], idle[1])
    }

    pub(super) fn print_plan(&self, mut loader: Loader, world: usize) {
        let (cfg, lm, ext) = (&self.cfg, &self.lm, &self.extension);
        let c = &lm.model.config;
        let params: i64 = lm.vs.variables().values().map(|t| t.numel() as i64).sum();
        let t = &cfg.train;
        let zero1 = world > 1 && cfg.distributed.zero1;
        let rows = cfg.rows_per_step(world);
        // The compute dtype (the weights were cast to it in setup).
        let kind = self.lm.model.lm_head_weight().kind();
        let share = if zero1 { 1.0 / world as f64 } else { 1.0 };
        let tokens = (t.micro_batch_rows * t.seq_len) as i64;
        let est = MemoryEstimate::new(c, kind, self.opt.memory(share), tokens, self.mem, self.device);
        let (l0, l) = (ext.original_length, ext.target_length);
        println!("plan");
        println!(
            "  model          {} ({:?}, {:.1}M parameters, {} layers)",
            cfg.model.path.display(),
            c.arch,
            params as f64 / 1e6,
            c.num_hidden_layers
        );
        println!("  window         {l0} -> {l} (x{:.2}), attention factor {:.4}", ext.scale(), ext.attention_factor);
        // The model's own window, as its config.json states it (the extension is applied).
        let own = ModelConfig::from_json_str(&serde_json::Value::Object(c.raw.clone()).to_string())
            .ok()
            .and_then(|own| own.sliding_window);
        if let Some(note) = ext.sliding_window_note(own) {
            println!("  sliding window {note}");
        }
        println!(
            "  long factors   {:.3} .. {:.3}   short factors {:.3} .. {:.3}",
            ext.long_factor[0],
            ext.long_factor.last().unwrap(),
            ext.short_factor[0],
            ext.short_factor.last().unwrap()
        );
        println!(
            "  steps          {}, {rows} rows x {} tokens = {} tokens/step",
            self.total_steps,
            t.seq_len,
            cfg.tokens_per_step(world)
        );
        if world > 1 {
            let (bal, rr) = self.idle_estimate(&mut loader, world, 16);
            println!(
                "  rank idle      {:.1}% with rows balanced by compute, {:.1}% round-robin (estimated, first 16 steps)",
                bal * 100.0,
                rr * 100.0
            );
        }
        if let Some(d) = &self.dist {
            println!(
                "  ranks          {world} ({:?} via {}), this one on {:?}; rows balanced by compute: {}, overlap: {}, \
                 ZeRO-1: {}, {} gradient buckets",
                d.pg.backend,
                d.launch.launcher,
                self.device,
                d.cfg.balance,
                d.cfg.overlap,
                d.cfg.zero1,
                self.sync.as_ref().map_or(0, |s| s.n_buckets())
            );
        }
        println!(
            "  rows           {:.0}% short (documents <= {l0}), {:.0}% long",
            cfg.data.short_share * 100.0,
            (1.0 - cfg.data.short_share) * 100.0
        );
        println!("  corpus         {} tokens in {} source(s)", loader.corpus().n_tokens(), loader.corpus().n_sources());
        let ranks = if world > 1 {
            format!(" per rank of {world}{}", if zero1 { " (ZeRO-1)" } else { "" })
        } else {
            String::new()
        };
        let gb = |x: f64| x / 1e9;
        println!(
            "  memory (est.)  {:.2} GB peak{ranks}: {:.2} weights+grads+optimizer, {:.2} saved activations, {:.2} layer \
             working set, {:.2} LM head, {:.2} optimizer temporaries, {:.2} runtime",
            gb(est.total_bytes()),
            gb(est.state),
            gb(est.saved),
            gb(est.layer),
            gb(est.head),
            gb(est.optimizer),
            gb(est.runtime)
        );
        println!(
            "  checkpoints    {} every {} steps, keep {} (about {:.2} GB each)",
            cfg.checkpoint.dir.display(),
            cfg.checkpoint.every,
            cfg.checkpoint.keep,
            Checkpoint::size_estimate(lm, &self.opt) as f64 / 1e9
        );
    }
}
