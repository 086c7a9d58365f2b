//! TensorBoard event files: every line `metrics.jsonl` gets (each step, each held-out
//! evaluation) is also written as scalars under `<checkpoint.dir>/tensorboard/`, by rank 0
//! only, as the metrics are; `[log] tensorboard = false` turns it off.
//!
//! **Same numbers by construction.** [`Metrics`](crate::metrics::Metrics) hands every JSON
//! object it writes to [`EventWriter::write`], which flattens its numbers into tags
//! ([`scalars`]): a step's `loss` -> `train/loss`, its `*_mb` figures -> `memory/<key>`, its
//! per-rank arrays -> `rank/<key>/<rank>` (`rank_compute_s` -> `rank/compute_s/0`, ...), a
//! held-out evaluation's `heldout_short` -> `eval/short`; nested objects join their keys with
//! `/`. Whatever fields a step line gains appear here too. Non-numbers (the event name, a
//! warning's text, `null` for a figure a step lacks) are left out; values are float32, as
//! TensorBoard stores them.
//!
//! **Format.** A file `events.out.tfevents.<unix seconds>.<host>.<pid>` of TFRecords (u64
//! length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each an
//! `Event` protobuf: wall_time (field 1, double), step (2, int64), and either file_version (3,
//! `"brain.Event:2"`, the first record) or summary (5) holding `Value { tag (1), simple_value
//! (2, float) }`. Those few fields and CRC-32C (a 256-entry table) are encoded here by hand,
//! which needs no protobuf or CRC crate.
//!
//! **Resume without duplicates.** TensorBoard reads every event file of a folder, in name
//! order, so a file still holding the steps a killed run made past its last checkpoint would
//! show them twice once the resumed run redoes them. [`EventWriter::resume`] at step S
//! therefore first rewrites each existing file to its records of steps <= S (atomically,
//! through `fsx::write_atomic`, so a crash leaves the old file or the new one; a record torn
//! by a crash is dropped too), exactly as `Metrics::resume` rewinds the JSONL, then starts a
//! new file whose time stamp is later than every older one's, so it also sorts after them.
//! Any reader (TensorBoard, `wandb sync`) then sees each step once, in order, with the older
//! records' original wall times. TensorBoard's own remedy, dropping data when a step goes
//! backwards, depends on the order it happens to read files in, and other readers lack it.
//! A fresh run removes the folder's event files, as it truncates the JSONL.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::Value;

/// The start of every event file's name (TensorBoard looks for `tfevents` in it).
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// The event file this process appends to.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A fresh run: earlier event files in `dir` are removed, then a new one is started.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        for f in event_files(dir)? {
            std::fs::remove_file(&f).with_context(|| format!("cannot remove old event file {}", f.display()))?;
        }
        Self::open(dir)
    }

    /// A run resumed at `step`: every event file in `dir` is cut back to steps <= `step` (see
    /// the module docs), then a new one is started.
    pub fn resume(dir: &Path, step: u64) -> Result<EventWriter> {
        for f in event_files(dir)? {
            rewind(&f, step)?;
        }
        Self::open(dir)
    }

    fn open(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the TensorBoard folder {} ([log] tensorboard)", dir.display()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let newest = event_files(dir)?.iter().filter_map(|f| time_stamp(f)).max();
        let secs = newest.map_or(now, |n| now.max(n + 1));
        let path = dir.join(format!("{FILE_PREFIX}{secs:010}.{}.{}", host_name(), std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create the event file {}", path.display()))?;
        let mut w = EventWriter { file, path };
        w.record(&encode_event(wall_time(), 0, Payload::FileVersion("brain.Event:2")))?;
        Ok(w)
    }

    /// The scalars of one metrics line (see [`scalars`]) as one event at its `step`; a line
    /// without a step or without numbers writes nothing.
    pub fn write(&mut self, line: &Value) -> Result<()> {
        let Some(step) = line.get("step").and_then(Value::as_u64) else {
            return Ok(());
        };
        let values = scalars(line);
        if values.is_empty() {
            return Ok(());
        }
        self.record(&encode_event(wall_time(), step as i64, Payload::Summary(&values)))
    }

    /// One record, flushed at once so a crash loses nothing already written.
    fn record(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&frame(data))
            .and_then(|()| self.file.flush())
            .with_context(|| format!("cannot write the event file {}", self.path.display()))
    }
}

/// The tags and values of a metrics line (see the module docs for the naming).
pub fn scalars(line: &Value) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    let Some(fields) = line.as_object() else {
        return out;
    };
    let event = fields.get("event").and_then(Value::as_str).unwrap_or("step");
    for (key, v) in fields {
        if key == "event" || key == "step" {
            continue;
        }
        let tag = match (event, key.strip_prefix("rank_")) {
            ("step", Some(rest)) if v.is_array() => format!("rank/{rest}"),
            ("step", _) if key.ends_with("_mb") => format!("memory/{key}"),
            ("step", _) => format!("train/{key}"),
            ("eval", _) => format!("eval/{}", key.strip_prefix("heldout_").unwrap_or(key)),
            (other, _) => format!("{other}/{key}"),
        };
        flatten(&tag, v, &mut out);
    }
    out
}

fn flatten(tag: &str, v: &Value, out: &mut Vec<(String, f32)>) {
    match v {
        Value::Number(n) => out.extend(n.as_f64().map(|x| (tag.to_string(), x as f32))),
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                flatten(&format!("{tag}/{i}"), x, out);
            }
        }
        Value::Object(fields) => {
            for (k, x) in fields {
                flatten(&format!("{tag}/{k}"), x, out);
            }
        }
        _ => {}
    }
}

/// The event files in `dir`, sorted by name (TensorBoard's reading order); none when `dir` is
/// missing. A staging copy a crash left behind (`.NAME.tmp`, see `fsx::write_atomic`) is
/// removed, as TensorBoard would read it as one more event file.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{FILE_PREFIX}")) && name.ends_with(".tmp") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove the stale copy {}", e.path().display()))?;
        } else if name.starts_with(FILE_PREFIX) {
            files.push(e.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Cut the event file at `path` back to its whole records of steps <= `step`.
fn rewind(path: &Path, step: u64) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the event file {}", path.display()))?;
    let mut kept = Vec::with_capacity(bytes.len());
    for (framed, data) in records(&bytes) {
        if event_step(data).is_some_and(|s| s <= step as i64) {
            kept.extend_from_slice(framed);
        }
    }
    if kept.len() != bytes.len() {
        longmix_core::fsx::write_atomic(path, &kept)?;
    }
    Ok(())
}

/// The whole records of an event file, each as (framed bytes, data): reading stops at the
/// first record that is torn or fails its checksums.
fn records(bytes: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + 12) {
        let len = u64::from_le_bytes(head[..8].try_into().unwrap());
        let len_ok = u32::from_le_bytes(head[8..].try_into().unwrap()) == masked_crc(&head[..8]);
        let Some(end) = usize::try_from(len).ok().and_then(|n| (at + 12).checked_add(n)) else {
            break;
        };
        let (Some(data), Some(crc)) = (bytes.get(at + 12..end), bytes.get(end..end + 4)) else {
            break;
        };
        if !len_ok || u32::from_le_bytes(crc.try_into().unwrap()) != masked_crc(data) {
            break;
        }
        out.push((&bytes[at..end + 4], data));
        at = end + 4;
    }
    out
}

/// A TFRecord: u64 length, masked CRC of the length, the data, masked CRC of the data.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

enum Payload<'a> {
    FileVersion(&'a str),
    Summary(&'a [(String, f32)]),
}

fn encode_event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut e = vec![1 << 3 | 1]; // wall_time: field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3); // step: field 2, varint
    put_varint(&mut e, step as u64);
    match payload {
        Payload::FileVersion(v) => put_bytes(&mut e, 3, v.as_bytes()),
        Payload::Summary(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                put_bytes(&mut value, 1, tag.as_bytes());
                value.push(2 << 3 | 5); // simple_value: field 2, 32-bit
                value.extend_from_slice(&v.to_le_bytes());
                put_bytes(&mut summary, 1, &value);
            }
            put_bytes(&mut e, 5, &summary);
        }
    }
    e
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The step field of an `Event` (0 when absent, as protobuf defaults it); `None` when the
/// bytes do not parse.
fn event_step(data: &[u8]) -> Option<i64> {
    let (mut at, mut step) = (0, 0);
    while at < data.len() {
        let key = get_varint(data, &mut at)?;
        match key & 7 {
            0 => {
                let v = get_varint(data, &mut at)?;
                if key >> 3 == 2 {
                    step = v as i64;
                }
            }
            1 => at += 8,
            2 => at += usize::try_from(get_varint(data, &mut at)?).ok()?,
            5 => at += 4,
            _ => return None,
        }
    }
    (at == data.len()).then_some(step)
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli), the checksum TFRecord uses.
pub fn crc32c(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |c, &b| CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The time stamp in an event file's name (`events.out.tfevents.<seconds>.`...).
fn time_stamp(path: &Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_prefix(FILE_PREFIX)?.split('.').next()?.parse().ok()
}

fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn metrics_lines_flatten_into_tags() {
        let step = json!({"event": "step", "step": 3, "loss": 2.5, "loss_short": null, "peak_rss_mb": 100.0,
            "rank_compute_s": [0.5, 0.75], "phases": {"forward_s": 0.25}, "stop": false});
        let mut got = scalars(&step);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want = [
            ("memory/peak_rss_mb", 100.0),
            ("rank/compute_s/0", 0.5),
            ("rank/compute_s/1", 0.75),
            ("train/loss", 2.5),
            ("train/phases/forward_s", 0.25),
        ];
        assert_eq!(got, want.map(|(t, v)| (t.to_string(), v)));
        let eval = json!({"event": "eval", "step": 4, "heldout_short": 3.0, "heldout_long": null});
        assert_eq!(scalars(&eval), [("eval/short".to_string(), 3.0)]);
        assert!(scalars(&json!({"event": "warning", "step": 1, "message": "m"})).is_empty());
    }

    #[test]
    fn resume_cuts_later_steps_and_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        for step in 1..=5 {
            w.write(&json!({"event": "step", "step": step, "loss": step as f64})).unwrap();
        }
        let first = w.path.clone();
        let mut bytes = std::fs::read(&first).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&frame(b"torn")[..9]);
        std::fs::write(&first, &bytes).unwrap();
        let steps = |p: &Path| {
            let b = std::fs::read(p).unwrap();
            records(&b).iter().map(|(_, d)| event_step(d).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(steps(&first), [0, 1, 2, 3, 4, 5]);
        let w2 = EventWriter::resume(dir.path(), 3).unwrap();
        assert_eq!(steps(&first), [0, 1, 2, 3]);
        assert!(std::fs::read(&first).unwrap().len() < whole);
        assert!(w2.path > first, "the new file sorts after the old one");
        assert_eq!(steps(&w2.path), [0]);
        drop(w2);
        EventWriter::create(dir.path()).unwrap();
        assert_eq!(event_files(dir.path()).unwrap().len(), 1, "a fresh run starts over");
    }
}
