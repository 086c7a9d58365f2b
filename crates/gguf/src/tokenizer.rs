//! Rebuilding a Hugging Face `tokenizer.json` and `tokenizer_config.json` from the tokenizer a
//! GGUF file describes in its `tokenizer.*` metadata.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported. The vocabulary, merges
//! and special tokens come straight from the file; what the file only names is how text is split
//! before BPE (`tokenizer.ggml.pre`), which is mapped to the pre-tokenizer the original Hugging
//! Face tokenizer of that family uses (see [`pre_tokenizer`]).

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Map, Value as Json};

use crate::error::{GgufError, Result};
use crate::llama::SpecialTokenIds;
use crate::reader::GgufFile;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const CONTROL: u64 = 3;
    pub const USER_DEFINED: u64 = 4;
}

/// The `tokenizer.ggml.pre` values this crate maps, for messages.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &["smollm", "starcoder", "gpt-2", "llama-bpe", "llama3", "llama-v3"];

/// LLaMA 3's split regex, as in its `tokenizer.json` and llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer files of a Hugging Face model folder.
#[derive(Clone, Debug)]
pub struct HfTokenizer {
    /// `tokenizer.json`, serialized.
    pub tokenizer_json: String,
    /// `tokenizer_config.json`.
    pub tokenizer_config: Json,
    pub special_ids: SpecialTokenIds,
    /// Number of tokens in the vocabulary.
    pub n_tokens: usize,
}

/// Builds the tokenizer files. `model_max_length` goes into `tokenizer_config.json`.
pub fn build_tokenizer(file: &GgufFile, model_max_length: usize) -> Result<HfTokenizer> {
    let meta = Metadata::read(file)?;
    let added = meta.added_tokens();
    let tokenizer_json = meta.tokenizer_json(&added)?;
    let tokenizer_config = meta.tokenizer_config(file, &added, model_max_length)?;
    Ok(HfTokenizer {
        tokenizer_json,
        tokenizer_config,
        special_ids: SpecialTokenIds { bos: meta.bos, eos: meta.eos, pad: meta.pad },
        n_tokens: meta.tokens.len(),
    })
}

/// The `tokenizer.*` metadata of a GGUF file, checked for what a byte-level BPE tokenizer needs.
struct Metadata<'a> {
    tokens: Vec<&'a str>,
    merges: Vec<&'a str>,
    /// llama.cpp's type of each token ([`token_type`]).
    types: Vec<u64>,
    pre_tokenizer: Json,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl<'a> Metadata<'a> {
    fn read(file: &'a GgufFile) -> Result<Self> {
        check_byte_level_bpe(file)?;
        let tokens = file.get_strings("tokenizer.ggml.tokens")?.ok_or(GgufError::MissingMetadata {
            key: "tokenizer.ggml.tokens".into(),
            hint: "the file carries no vocabulary; re-convert the model with llama.cpp",
        })?;
        let merges = file.get_strings("tokenizer.ggml.merges")?.ok_or(GgufError::MissingMetadata {
            key: "tokenizer.ggml.merges".into(),
            hint: "a BPE tokenizer needs its merges; re-convert the model with a current llama.cpp",
        })?;
        let types = token_types(file, tokens.len())?;
        let pre = file.get_str("tokenizer.ggml.pre")?.ok_or(GgufError::MissingMetadata {
            key: "tokenizer.ggml.pre".into(),
            hint:
                "without it the way text is split before BPE is unknown; re-convert the model with a current llama.cpp",
        })?;
        let pre_tokenizer = pre_tokenizer(pre)?;
        let id_of = |key: &str| -> Result<Option<u32>> {
            match file.get_u64(key)? {
                None => Ok(None),
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(id) => Err(GgufError::Inconsistent(format!(
                    "{key} is {id}, but the vocabulary has {} tokens",
                    tokens.len()
                ))),
            }
        };
        let bos = id_of("tokenizer.ggml.bos_token_id")?;
        let eos = id_of("tokenizer.ggml.eos_token_id")?;
        let unk = id_of("tokenizer.ggml.unknown_token_id")?;
        let pad = id_of("tokenizer.ggml.padding_token_id")?;
        let add_bos = file.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = file.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        Ok(Metadata { tokens, merges, types, pre_tokenizer, bos, eos, unk, pad, add_bos, add_eos })
    }

    /// The text of token `id`.
    fn token(&self, id: Option<u32>) -> Option<&'a str> {
        id.map(|id| self.tokens[id as usize])
    }

    /// Control tokens are special added tokens; user-defined ones are added tokens matched
    /// whole but not special. Both keep their text as the file spells it.
    fn added_tokens(&self) -> Vec<AddedToken<'a>> {
        self.tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == token_type::CONTROL || ty == token_type::USER_DEFINED)
            .map(|(id, (&content, &ty))| AddedToken { id: id as u32, content, special: ty == token_type::CONTROL })
            .collect()
    }

    /// `tokenizer.json`, serialized.
    fn tokenizer_json(&self, added: &[AddedToken<'a>]) -> Result<String> {
        let vocab = Vocab::new(&self.tokens, &self.types)?;
        let merges = self.bpe_merges()?;
        let tokenizer = TokenizerJson {
            version: "1.0",
            truncation: None,
            padding: None,
            added_tokens: added,
            normalizer: None,
            pre_tokenizer: self.pre_tokenizer.clone(),
            post_processor: self.post_processor()?,
            decoder: json!({
                "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true,
            }),
            model: BpeModel {
                kind: "BPE",
                dropout: None,
                unk_token: None,
                continuing_subword_prefix: None,
                end_of_word_suffix: None,
                fuse_unk: false,
                byte_fallback: false,
                ignore_merges: false,
                vocab,
                merges,
            },
        };
        serde_json::to_string(&tokenizer).map_err(|source| GgufError::Json { file: "tokenizer.json", source })
    }

    fn bpe_merges(&self) -> Result<Vec<(&'a str, &'a str)>> {
        self.merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a, b)),
                _ => Err(GgufError::Inconsistent(format!("BPE merge {m:?} is not two tokens separated by one space"))),
            })
            .collect()
    }

    /// `ByteLevel`, followed by a template adding BOS and/or EOS when the file asks for them.
    fn post_processor(&self) -> Result<Json> {
        let byte_level_post = json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true,
        });
        if !(self.add_bos || self.add_eos) {
            return Ok(byte_level_post);
        }
        let with = |flag: bool, id: Option<u32>, what: &str| -> Result<Option<(&str, u32)>> {
            match (flag, id) {
                (false, _) => Ok(None),
                (true, Some(id)) => Ok(Some((self.tokens[id as usize], id))),
                (true, None) => Err(GgufError::Inconsistent(format!(
                    "tokenizer.ggml.add_{what}_token is set but there is no {what} token id"
                ))),
            }
        };
        let template = template(with(self.add_bos, self.bos, "bos")?, with(self.add_eos, self.eos, "eos")?);
        Ok(json!({"type": "Sequence", "processors": [byte_level_post, template]}))
    }

    /// `tokenizer_config.json`.
    fn tokenizer_config(&self, file: &GgufFile, added: &[AddedToken], model_max_length: usize) -> Result<Json> {
        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert("add_bos_token".into(), json!(self.add_bos));
        config.insert("add_eos_token".into(), json!(self.add_eos));
        for (key, id) in
            [("bos_token", self.bos), ("eos_token", self.eos), ("unk_token", self.unk), ("pad_token", self.pad)]
        {
            if let Some(text) = self.token(id) {
                config.insert(key.into(), json!(text));
            }
        }
        if let Some(template) = file.get_str("tokenizer.chat_template")? {
            config.insert("chat_template".into(), json!(template));
        }
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        config.insert("model_max_length".into(), json!(model_max_length));
        config.insert("added_tokens_decoder".into(), Json::Object(added_tokens_decoder(added)));
        Ok(Json::Object(config))
    }
}

/// Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) can be rebuilt.
fn check_byte_level_bpe(file: &GgufFile) -> Result<()> {
    let model = file.get_str("tokenizer.ggml.model")?.ok_or(GgufError::MissingMetadata {
        key: "tokenizer.ggml.model".into(),
        hint: "the file carries no tokenizer; use a GGUF converted with its tokenizer",
    })?;
    if model != "gpt2" {
        return Err(GgufError::Unsupported(format!(
            "tokenizer model {model:?} is not supported: only byte-level BPE (\"gpt2\", as in SmolLM, \
             StarCoder and LLaMA 3) can be rebuilt; SentencePiece (\"llama\") tokenizers cannot"
        )));
    }
    Ok(())
}

/// `tokenizer.ggml.token_type`, one per token (all normal when the file has none).
fn token_types(file: &GgufFile, n_tokens: usize) -> Result<Vec<u64>> {
    match file.get_u64s("tokenizer.ggml.token_type")? {
        Some(types) if types.len() != n_tokens => Err(GgufError::Inconsistent(format!(
            "tokenizer.ggml.token_type has {} entries for {n_tokens} tokens",
            types.len()
        ))),
        Some(types) => Ok(types),
        None => Ok(vec![1; n_tokens]),
    }
}

/// `added_tokens_decoder` of `tokenizer_config.json`: each added token by id.
fn added_tokens_decoder(added: &[AddedToken]) -> Map<String, Json> {
    added
        .iter()
        .map(|t| {
            let entry = json!({
                "content": t.content, "lstrip": false, "normalized": false, "rstrip": false,
                "single_word": false, "special": t.special,
            });
            (t.id.to_string(), entry)
        })
        .collect()
}

/// The Hugging Face pre-tokenizer for a `tokenizer.ggml.pre` value.
///
/// * `smollm`, `starcoder`: `Sequence[Digits(individual_digits), ByteLevel(use_regex)]`, the
///   pre-tokenizer of the original SmolLM / StarCoder `tokenizer.json`. llama.cpp implements the
///   same split as the regex `\p{N}` followed by the GPT-2 regex.
/// * `gpt-2`: `ByteLevel(use_regex)`, GPT-2's own regex.
/// * `llama-bpe` / `llama3` / `llama-v3`: LLaMA 3's split regex, then `ByteLevel` without regex.
///
/// Other values are refused rather than guessed: a wrong split tokenizes silently differently.
pub fn pre_tokenizer(pre: &str) -> Result<Json> {
    let byte_level = |use_regex: bool| {
        json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex,
        })
    };
    match pre {
        "smollm" | "starcoder" => Ok(json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
        })),
        "gpt-2" => Ok(byte_level(true)),
        "llama-bpe" | "llama3" | "llama-v3" => Ok(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ],
        })),
        other => Err(GgufError::Unsupported(format!(
            "pre-tokenizer {other:?} (tokenizer.ggml.pre) is not supported; supported: {}",
            SUPPORTED_PRE_TOKENIZERS.join(", ")
        ))),
    }
}

/// A `TemplateProcessing` post-processor adding BOS and/or EOS around each sequence.
fn template(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Json {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let wrap = |id: &str, type_id: u32| {
        let mut parts = Vec::new();
        parts.extend(bos.map(|(t, _)| special(t, type_id)));
        parts.push(sequence(id, type_id));
        parts.extend(eos.map(|(t, _)| special(t, type_id)));
        parts
    };
    let single = wrap("A", 0);
    let pair: Vec<Json> = wrap("A", 0).into_iter().chain(wrap("B", 1)).collect();
    let special_tokens: Map<String, Json> = bos
        .into_iter()
        .chain(eos)
        .map(|(t, id)| (t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]})))
        .collect();
    json!({
        "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens,
    })
}

#[derive(serde::Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<Json>,
    padding: Option<Json>,
    added_tokens: &'a [AddedToken<'a>],
    normalizer: Option<Json>,
    pre_tokenizer: Json,
    post_processor: Json,
    decoder: Json,
    model: BpeModel<'a>,
}

#[derive(serde::Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: Vocab<'a>,
    merges: Vec<(&'a str, &'a str)>,
}

struct AddedToken<'a> {
    id: u32,
    content: &'a str,
    special: bool,
}

impl Serialize for AddedToken<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        json!({
            "id": self.id,
            "content": self.content,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": self.special,
        })
        .serialize(s)
    }
}

/// The BPE vocabulary, serialized as a JSON object in id order.
struct Vocab<'a>(Vec<(std::borrow::Cow<'a, str>, u32)>);

impl<'a> Vocab<'a> {
    /// Ordinary tokens must be spelled in the byte-level alphabet; one that is not (a llama.cpp
    /// export of a decoded token) is respelled byte by byte, as transformers does. Control and
    /// user-defined tokens keep their text, which is what an added token is matched against.
    fn new(tokens: &[&'a str], types: &[u64]) -> Result<Self> {
        let alphabet = byte_level_alphabet();
        let in_alphabet = |c: char| alphabet.contains(&c);
        let mut seen = std::collections::HashMap::with_capacity(tokens.len());
        let mut entries = Vec::with_capacity(tokens.len());
        for (id, (&token, &ty)) in tokens.iter().zip(types).enumerate() {
            let added = ty == token_type::CONTROL || ty == token_type::USER_DEFINED;
            let spelled: std::borrow::Cow<str> = if added || token.chars().all(in_alphabet) {
                token.into()
            } else {
                token.bytes().map(|b| alphabet[b as usize]).collect::<String>().into()
            };
            if let Some(first) = seen.insert(spelled.clone(), id) {
                return Err(GgufError::Inconsistent(format!(
                    "tokens {first} and {id} are both {spelled:?}; a BPE vocabulary needs distinct tokens"
                )));
            }
            entries.push((spelled, id as u32));
        }
        Ok(Vocab(entries))
    }
}

impl Serialize for Vocab<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (token, id) in &self.0 {
            map.serialize_entry(token, id)?;
        }
        map.end()
    }
}

/// GPT-2's `bytes_to_unicode`: the character each byte is spelled with in a byte-level vocabulary.
pub fn byte_level_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next).expect("256..324 are valid chars");
            next += 1;
            c
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_matches_gpt2() {
        let a = byte_level_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'a' as usize], 'a');
        assert_eq!(a[0xA0], 'ł');
        assert_eq!(a[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused() {
        let err = pre_tokenizer("deepseek-llm").unwrap_err().to_string();
        assert!(err.contains("deepseek-llm") && err.contains("smollm"), "{err}");
    }
}
