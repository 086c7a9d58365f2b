//! The two things evaluation needs from a model and a tokenizer, as traits, so the scoring
//! machinery can be tested on models whose outcome is forced.

use anyhow::Result;
use longmix_model::{CausalLm, DecodeOptions, GenerateOptions, Sampling, StringConfig};
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
    /// Positions per LM-head chunk when scoring (logits for 16k tokens x 49k vocab would be
    /// 3 GB in float32).
    pub head_chunk: i64,
}

impl<'a> TchLm<'a> {
    pub fn new(model: &'a CausalLm, string: Option<StringConfig>) -> Self {
        TchLm { model, string, stop_tokens: model.config.eos_token_id.into_iter().collect(), head_chunk: 1024 }
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
        tch::no_grad(|| {
            let hidden = match &self.string {
                None => self.model.hidden_states(&input, &Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0)),
                Some(s) => longmix_model::string::hidden_states(self.model, &input, s),
            };
            let first = first_target as i64;
            let (mut sum, mut count) = (0f64, 0usize);
            let mut start = first - 1; // hidden position predicting token `start + 1`
            while start < n - 1 {
                let len = self.head_chunk.min(n - 1 - start);
                let logits = self.model.logits(&hidden.narrow(1, start, len)).squeeze_dim(0);
                let targets = input.narrow(1, start + 1, len).squeeze_dim(0);
                let lp = logits.log_softmax(-1, Kind::Float).gather(1, &targets.unsqueeze(1), false);
                sum -= lp.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
                count += len as usize;
                start += len;
            }
            Ok((sum, count))
        })
    }
}
