//! Synthetic long-context prompts (`docs/numerics.md` §5), built at the token level so
//! every prompt has **exactly** the requested number of tokens.
//!
//! A prompt is the concatenation of separately tokenized pieces: the tokenizer's own leading
//! special tokens (e.g. BOS), the instruction, haystack tokens, the needle, more haystack, and
//! the question. The haystack is a long token stream cut at token granularity (as the passkey
//! reference cuts its filler at character granularity), so the filler fills the budget to the
//! token. Every random choice comes from a generator seeded by (seed, task, length, depth,
//! sample), so the same command gives the same prompts for every model and every override.

use anyhow::{bail, Result};
use longmix_model::generate::SplitMix64;

use crate::lm::TextTokenizer;

/// RULER's noise haystack sentence (also the passkey filler).
pub const NOISE: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// The passkey instruction (LongRoPE / YaRN / landmark-attention `passkey.py`).
pub const PASSKEY_TASK: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.";
pub const PASSKEY_QUESTION: &str = "What is the pass key? The pass key is";

/// A generator seeded from a run seed and the coordinates of one sample.
pub fn sample_rng(seed: u64, parts: &[u64]) -> SplitMix64 {
    let mut h = SplitMix64::new(seed ^ 0x006C_6F6E_676D_6978);
    let mut state = h.next_u64();
    for &p in parts {
        state = SplitMix64::new(state ^ p.wrapping_mul(longmix_core::GOLDEN_GAMMA)).next_u64();
    }
    SplitMix64::new(state)
}

/// A source of haystack tokens: units (sentences) tokenized once, cycled as needed.
pub struct Haystack {
    units: Vec<Vec<i64>>,
    /// What precedes each unit (`\n` for noise lines, a space for sentences): a leading
    /// separator keeps byte-level BPE tokens as they are in running text (`" The"`).
    pub sep: String,
    pub name: String,
}

impl Haystack {
    /// RULER's noise: the noise paragraph, one per line.
    pub fn noise(tok: &dyn TextTokenizer) -> Result<Self> {
        Self::from_units(tok, &[NOISE.to_string()], "\n", "noise")
    }

    /// Sentences of a real text (whitespace-normalised, split after `.`, `!`, `?`), each
    /// preceded by a space; only the first sentences making up at least `min_tokens` tokens
    /// are kept (all of them if the text is shorter; it is then cycled).
    pub fn text(tok: &dyn TextTokenizer, text: &str, name: &str, min_tokens: usize) -> Result<Self> {
        let sentences = split_sentences(text);
        if sentences.is_empty() {
            bail!("the haystack text {name} holds no sentence");
        }
        let mut units = Vec::new();
        let mut total = 0;
        for s in sentences {
            let ids = tok.encode(&format!(" {s}"), false)?;
            total += ids.len();
            units.push(ids);
            if total >= min_tokens {
                break;
            }
        }
        if total == 0 {
            bail!("the haystack {name} tokenizes to nothing");
        }
        Ok(Haystack { units, sep: " ".into(), name: name.to_string() })
    }

    /// `unit` repeated (joined by `sep`) into one stream of at least `min_tokens` tokens,
    /// tokenized as a whole (the passkey filler: `" ".join([garbage] * n)[:chars]`).
    pub fn repeated(tok: &dyn TextTokenizer, unit: &str, sep: &str, min_tokens: usize, name: &str) -> Result<Self> {
        let per = tok.encode(&format!("{unit}{sep}"), false)?.len().max(1);
        let n = min_tokens / per + 2;
        let text = vec![unit; n].join(sep);
        let stream = tok.encode(&text, false)?;
        Ok(Haystack { units: vec![stream], sep: sep.to_string(), name: name.to_string() })
    }

    /// Units each preceded by `sep`, tokenized one by one.
    pub fn from_units(tok: &dyn TextTokenizer, units: &[String], sep: &str, name: &str) -> Result<Self> {
        let units: Vec<Vec<i64>> =
            units.iter().map(|u| tok.encode(&format!("{sep}{u}"), false)).collect::<Result<_>>()?;
        if units.iter().all(Vec::is_empty) {
            bail!("the haystack {name} tokenizes to nothing");
        }
        Ok(Haystack { units, sep: sep.to_string(), name: name.to_string() })
    }

    /// Exactly `len` tokens starting at unit `start` (cycling), and the offsets at which a
    /// unit begins (always including 0 and `len`).
    pub fn take(&self, start: usize, len: usize) -> (Vec<i64>, Vec<usize>) {
        let mut out = Vec::with_capacity(len);
        let mut bounds = vec![0];
        let mut u = start % self.units.len();
        while out.len() < len {
            let unit = &self.units[u];
            let take = unit.len().min(len - out.len());
            out.extend_from_slice(&unit[..take]);
            if out.len() < len {
                bounds.push(out.len());
            }
            u = (u + 1) % self.units.len();
        }
        bounds.push(len);
        bounds.dedup();
        (out, bounds)
    }

    pub fn n_units(&self) -> usize {
        self.units.len()
    }
}

/// Split text into sentences after `.`, `!` or `?` followed by whitespace (whitespace runs
/// collapse to one space).
pub fn split_sentences(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for w in words {
        cur.push(w);
        if w.ends_with(['.', '!', '?']) || w.ends_with(".\"") || w.ends_with("?\"") || w.ends_with("!\"") {
            out.push(cur.join(" "));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(cur.join(" "));
    }
    out
}

/// The tokenizer's own leading special tokens (BOS for LLaMA / Phi-3 tokenizers, none for SmolLM2).
pub fn leading_specials(tok: &dyn TextTokenizer) -> Result<Vec<i64>> {
    longmix_core::leading_specials(|text, special| tok.encode(text, special))
}

/// One passkey prompt.
#[derive(Debug, Clone)]
pub struct PasskeySample {
    pub length: usize,
    /// Requested depth in [0, 1].
    pub depth: f64,
    pub key: u64,
    pub prompt: Vec<i64>,
    /// Token index where the "The pass key is ..." line starts.
    pub needle_at: usize,
}

/// The passkey prompt of exactly `length` tokens with `key` at `depth` of the filler:
/// `[specials] task \n <filler[..a]> \n The pass key is K. Remember it. K is the pass key. \n
/// <filler[..b]> \n What is the pass key? The pass key is`.
pub fn passkey_sample(
    tok: &dyn TextTokenizer,
    filler: &Haystack,
    length: usize,
    depth: f64,
    key: u64,
) -> Result<PasskeySample> {
    let specials = leading_specials(tok)?;
    let head = tok.encode(&format!("{PASSKEY_TASK}\n"), false)?;
    let needle = tok.encode(&format!("\nThe pass key is {key}. Remember it. {key} is the pass key.\n"), false)?;
    let question = tok.encode(&format!("\n{PASSKEY_QUESTION}"), false)?;
    let fixed = specials.len() + head.len() + needle.len() + question.len();
    if length < fixed {
        bail!(
            "a passkey prompt needs at least {fixed} tokens (instruction, key line, question); {length} is too short"
        );
    }
    let budget = length - fixed;
    let a = (depth.clamp(0.0, 1.0) * budget as f64).round() as usize;
    let (prefix, _) = filler.take(0, a);
    let (suffix, _) = filler.take(0, budget - a);
    let mut prompt = Vec::with_capacity(length);
    prompt.extend(specials);
    prompt.extend(head);
    prompt.extend(prefix);
    let needle_at = prompt.len();
    prompt.extend(needle);
    prompt.extend(suffix);
    prompt.extend(question);
    debug_assert_eq!(prompt.len(), length);
    Ok(PasskeySample { length, depth, key, prompt, needle_at })
}

/// The first run of ASCII digits in `text`, as a number (None if there is none or it overflows).
pub fn first_integer(text: &str) -> Option<u64> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits: String = text[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// What a needle's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedleValue {
    /// 7-digit numbers.
    Numbers,
    /// adjective-noun words.
    Words,
    /// UUIDs (version 4).
    Uuids,
}

impl NeedleValue {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "numbers" | "number" => NeedleValue::Numbers,
            "words" | "word" => NeedleValue::Words,
            "uuids" | "uuid" => NeedleValue::Uuids,
            _ => bail!("unknown needle value type {s:?}: use numbers, words or uuids"),
        })
    }

    /// RULER's `type_needle_v` (plural).
    pub fn plural(self) -> &'static str {
        match self {
            NeedleValue::Numbers => "numbers",
            NeedleValue::Words => "words",
            NeedleValue::Uuids => "uuids",
        }
    }

    pub fn random(self, rng: &mut SplitMix64) -> String {
        match self {
            NeedleValue::Numbers => (1_000_000 + rng.below(9_000_000)).to_string(),
            NeedleValue::Words => random_word(rng),
            NeedleValue::Uuids => random_uuid(rng),
        }
    }
}

const ADJECTIVES: &[&str] = &[
    "abundant",
    "adorable",
    "agreeable",
    "alive",
    "ancient",
    "angry",
    "bashful",
    "bitter",
    "brave",
    "breezy",
    "bright",
    "calm",
    "careful",
    "cheerful",
    "chilly",
    "clever",
    "clumsy",
    "cold",
    "colossal",
    "cool",
    "crooked",
    "curious",
    "damp",
    "delightful",
    "dizzy",
    "eager",
    "elegant",
    "empty",
    "fancy",
    "fierce",
    "fluffy",
    "fragile",
    "gentle",
    "gifted",
    "glamorous",
    "gleaming",
    "grumpy",
    "handsome",
    "helpful",
    "hollow",
    "humble",
    "hungry",
    "icy",
    "jolly",
    "kind",
    "lazy",
    "little",
    "lively",
    "lucky",
    "magnificent",
    "mighty",
    "modern",
    "muddy",
    "mysterious",
    "nervous",
    "noisy",
    "obedient",
    "odd",
    "old",
    "plain",
    "polite",
    "proud",
    "quaint",
    "quiet",
    "rapid",
    "rare",
    "rich",
    "rough",
    "rustic",
    "scary",
    "shiny",
    "silent",
    "silly",
    "sleepy",
    "smooth",
    "soft",
    "sparkling",
    "spicy",
    "steady",
    "sticky",
    "stormy",
    "strange",
    "swift",
    "tame",
    "tender",
    "thankful",
    "thirsty",
    "tiny",
    "vast",
    "wandering",
    "warm",
    "wise",
    "witty",
    "wooden",
    "yellow",
    "young",
    "zany",
    "zealous",
    "frosty",
    "golden",
];

const NOUNS: &[&str] = &[
    "age",
    "airport",
    "apple",
    "arrow",
    "baker",
    "balloon",
    "basket",
    "beach",
    "bicycle",
    "blanket",
    "bottle",
    "bridge",
    "butter",
    "cabin",
    "camera",
    "candle",
    "canyon",
    "castle",
    "cellar",
    "chair",
    "cherry",
    "circus",
    "cloud",
    "compass",
    "cottage",
    "crayon",
    "dancer",
    "desert",
    "diamond",
    "dolphin",
    "dragon",
    "engine",
    "falcon",
    "feather",
    "festival",
    "forest",
    "fountain",
    "garden",
    "glacier",
    "guitar",
    "hammer",
    "harbor",
    "helmet",
    "island",
    "jacket",
    "journey",
    "kettle",
    "kitten",
    "ladder",
    "lantern",
    "library",
    "lighthouse",
    "meadow",
    "mirror",
    "monkey",
    "mountain",
    "needle",
    "notebook",
    "ocean",
    "orchard",
    "painter",
    "palace",
    "parrot",
    "pencil",
    "pepper",
    "piano",
    "pillow",
    "planet",
    "pocket",
    "puzzle",
    "rabbit",
    "rainbow",
    "river",
    "rocket",
    "saddle",
    "sailor",
    "scarf",
    "shadow",
    "shelter",
    "silver",
    "spider",
    "station",
    "statue",
    "storm",
    "sunset",
    "teacher",
    "thunder",
    "tiger",
    "tower",
    "tractor",
    "trumpet",
    "tunnel",
    "umbrella",
    "valley",
    "village",
    "violin",
    "volcano",
    "wagon",
    "window",
    "wizard",
];

fn random_word(rng: &mut SplitMix64) -> String {
    let a = ADJECTIVES[rng.below(ADJECTIVES.len() as u64) as usize];
    let n = NOUNS[rng.below(NOUNS.len() as u64) as usize];
    format!("{a}-{n}")
}

/// `str(uuid.UUID(int=random.getrandbits(128), version=4))`: version nibble 4, variant 10xx.
fn random_uuid(rng: &mut SplitMix64) -> String {
    let mut x = ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128;
    x &= !(0xc000u128 << 48);
    x |= 0x8000u128 << 48;
    x &= !(0xf000u128 << 64);
    x |= 4u128 << 76;
    let h = format!("{x:032x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// One RULER-style single-needle prompt.
#[derive(Debug, Clone)]
pub struct NiahSample {
    pub length: usize,
    pub depth: f64,
    pub key: String,
    pub value: String,
    /// The references `string_match_all` looks for.
    pub outputs: Vec<String>,
    pub prompt: Vec<i64>,
    pub needle_at: usize,
}

/// RULER niah_single, singular form (`Some`->`A`, `are all`->`is`, `are`->`is`, value type
/// without its plural s), with the answer prefix appended (as RULER feeds base models):
///
/// `[specials] A special magic {v} is hidden within the following text. Make sure to memorize
/// it. I will quiz you about the {v} afterwards.\n{haystack with needle}\nWhat is the special
/// magic {v} for {key} mentioned in the provided text? The special magic {v} for {key}
/// mentioned in the provided text is`
///
/// The needle `One of the special magic {vs} for {key} is: {value}.` (RULER keeps the plural
/// there) is inserted at the haystack unit boundary nearest to `depth` of the haystack tokens.
pub fn niah_sample(
    tok: &dyn TextTokenizer,
    haystack: &Haystack,
    value_type: NeedleValue,
    length: usize,
    depth: f64,
    rng: &mut SplitMix64,
) -> Result<NiahSample> {
    let key = random_word(rng);
    let value = value_type.random(rng);
    let start = rng.below(haystack.n_units() as u64) as usize;
    let vs = value_type.plural();
    let v = &vs[..vs.len() - 1];
    let specials = leading_specials(tok)?;
    let head = tok.encode(
        &format!("A special magic {v} is hidden within the following text. Make sure to memorize it. I will quiz you about the {v} afterwards.\n"),
        false,
    )?;
    let needle = tok.encode(&format!("{}One of the special magic {vs} for {key} is: {value}.", haystack.sep), false)?;
    let tail = tok.encode(
        &format!("\nWhat is the special magic {v} for {key} mentioned in the provided text? The special magic {v} for {key} mentioned in the provided text is"),
        false,
    )?;
    let fixed = specials.len() + head.len() + needle.len() + tail.len();
    if length < fixed {
        bail!("a needle prompt needs at least {fixed} tokens (instruction, needle, question); {length} is too short");
    }
    let budget = length - fixed;
    let (hay, bounds) = haystack.take(start, budget);
    let want = depth.clamp(0.0, 1.0) * budget as f64;
    let cut = *bounds
        .iter()
        .min_by(|a, b| ((**a as f64 - want).abs()).partial_cmp(&(**b as f64 - want).abs()).unwrap())
        .unwrap();
    let mut prompt = Vec::with_capacity(length);
    prompt.extend(specials);
    prompt.extend(head);
    prompt.extend_from_slice(&hay[..cut]);
    let needle_at = prompt.len();
    prompt.extend(needle);
    prompt.extend_from_slice(&hay[cut..]);
    prompt.extend(tail);
    debug_assert_eq!(prompt.len(), length);
    Ok(NiahSample { length, depth, key, outputs: vec![value.clone()], value, prompt, needle_at })
}

/// RULER's `string_match_all` for one prediction: the fraction of references found in it
/// (case-insensitive), in [0, 1].
pub fn string_match_all(prediction: &str, references: &[String]) -> f64 {
    if references.is_empty() {
        return 0.0;
    }
    let p = prediction.to_lowercase();
    references.iter().filter(|r| p.contains(&r.to_lowercase())).count() as f64 / references.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4() {
        let mut rng = SplitMix64::new(7);
        for _ in 0..20 {
            let u = random_uuid(&mut rng);
            assert_eq!(u.len(), 36);
            assert_eq!(&u[14..15], "4", "{u}");
            assert!("89ab".contains(&u[19..20]), "{u}");
        }
    }

    #[test]
    fn sentences_split_on_terminators() {
        let s = split_sentences("In the beginning.  And God said, Let there be light: and there was light! Why? end");
        assert_eq!(
            s,
            vec!["In the beginning.", "And God said, Let there be light: and there was light!", "Why?", "end"]
        );
    }
}
