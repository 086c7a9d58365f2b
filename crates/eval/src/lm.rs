//! The two things evaluation needs from a model and a tokenizer, as traits, so the scoring
//! machinery can be tested on models whose outcome is forced.

use anyhow::Result;
use longmix_model::{CausalLm, DecodeOptions, GenerateOptions, Sampling, StringConfig, IGNORE_INDEX};
use tch::{Kind, Tensor};

/// Text <-> token ids.
pub trait TextTokenizer {
    /// Token ids of `text`; `special` adds the tokenizer's special tokens (e.g. BOS).
    fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>>;
    fn decode(&self, ids: &[i64]) -> Result<String>;
}

impl TextTokenizer for tokenizers::Tokenizer {
    fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        // The inherent methods live on the TokenizerImpl the Tokenizer derefs to.
        let enc = std::ops::Deref::deref(self).encode(text, special).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        std::ops::Deref::deref(self).decode(&ids, true).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }
}

/// A causal language model as evaluation sees it.
pub trait LanguageModel {
    /// Greedy continuation of each prompt, at most `max_new_tokens` tokens.
    fn generate(&mut self, prompts: &[Vec<i64>], max_new_tokens: usize) -> Result<Vec<Vec<i64>>>;
    /// Summed next-token NLL of `ids[first_target..]` (each predicted from everything before
    /// it; `first_target >= 1`) and the number of tokens scored.
    fn nll(&mut self, ids: &[i64], first_target: usize) -> Result<(f64, usize)>;
}

/// A [`CausalLm`] with plain attention or STRING.
pub struct TchLm<'a> {
    pub model: &'a CausalLm,
    pub string: Option<StringConfig>,
    /// Generation stops at these tokens (the model's EOS).
    pub stop_tokens: Vec<i64>,
}

impl<'a> TchLm<'a> {
    pub fn new(model: &'a CausalLm, string: Option<StringConfig>) -> Self {
        TchLm { model, string, stop_tokens: model.config.eos_token_id.into_iter().collect() }
    }
}

impl LanguageModel for TchLm<'_> {
    fn generate(&mut self, prompts: &[Vec<i64>], max_new_tokens: usize) -> Result<Vec<Vec<i64>>> {
        let opts = GenerateOptions {
            max_new_tokens,
            sampling: Sampling::Greedy,
            stop_tokens: self.stop_tokens.clone(),
            decode: DecodeOptions { string: self.string, refresh_on_table_change: true },
            use_cache: true,
        };
        Ok(longmix_model::generate(self.model, prompts, &opts)?.tokens)
    }

    fn nll(&mut self, ids: &[i64], first_target: usize) -> Result<(f64, usize)> {
        anyhow::ensure!(first_target >= 1 && first_target < ids.len(), "nothing to score");
        let device = self.model.lm_head_weight().device();
        let n = ids.len() as i64;
        let input = Tensor::from_slice(ids).unsqueeze(0).to_device(device);
        // Position t predicts token t + 1; only tokens from `first_target` on are scored.
        let targets: Vec<i64> = (0..ids.len())
            .map(|t| if t + 1 >= first_target && t + 1 < ids.len() { ids[t + 1] } else { IGNORE_INDEX })
            .collect();
        let targets = Tensor::from_slice(&targets).unsqueeze(0).to_device(device);
        let loss = tch::no_grad(|| {
            let hidden = match &self.string {
                None => self.model.hidden_states(&input, &Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0)),
                Some(s) => longmix_model::string::hidden_states(self.model, &input, s),
            };
            self.model.head_nll(&hidden, &targets, None, None)
        });
        Ok((loss.sum(), loss.tokens() as usize))
    }
}
