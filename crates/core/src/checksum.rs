//! Checksums of the files longmix writes, taken from the bytes on their way to the file.
//!
//! Two algorithms, each where it fits best:
//!
//! * [`Algo::Xxh3`] (XXH3-64) for checkpoints: 15-17 GB/s on one core, so hashing a 100 GB
//!   checkpoint while it is written costs seconds, against minutes to write it (CRC-32C and
//!   CRC-32 measure the same within 10% here; XXH3's 64 bits collide less by chance).
//! * [`Algo::Sha256`] for exports: what `sha256sum -c` checks on any machine and what the Hugging
//!   Face Hub shows for each LFS file; 1.6 GB/s (SHA-NI) is small beside a model export.
//!
//! A writer wrapped in [`Summed`] hashes what passes through it, so no file is read back to be
//! summed; [`file_sum`] reads a file once to check it later.

use std::fmt;
use std::fs::File;
use std::hash::Hasher as _;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A checksum algorithm, named in manifests as [`Algo::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Xxh3,
    Sha256,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Xxh3 => "xxh3-64",
            Algo::Sha256 => "sha256",
        }
    }

    pub fn from_name(name: &str) -> Result<Algo> {
        match name {
            "xxh3-64" => Ok(Algo::Xxh3),
            "sha256" => Ok(Algo::Sha256),
            other => bail!("unknown checksum algorithm {other:?} (this longmix knows xxh3-64 and sha256)"),
        }
    }

    fn hasher(self) -> State {
        match self {
            Algo::Xxh3 => State::Xxh3(Box::default()),
            Algo::Sha256 => State::Sha256(sha2::Sha256::new()),
        }
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

enum State {
    Xxh3(Box<twox_hash::XxHash3_64>),
    Sha256(sha2::Sha256),
}

impl State {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            State::Xxh3(h) => h.write(bytes),
            State::Sha256(h) => h.update(bytes),
        }
    }

    fn hex(self) -> String {
        match self {
            State::Xxh3(h) => format!("{:016x}", h.finish()),
            State::Sha256(h) => h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// What a manifest records of one file: its length and its checksum (lowercase hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub hash: String,
}

/// A writer that hashes and counts every byte written through it.
pub struct Summed<W> {
    inner: W,
    state: State,
    bytes: u64,
}

impl<W: Write> Summed<W> {
    pub fn new(inner: W, algo: Algo) -> Summed<W> {
        Summed { inner, state: algo.hasher(), bytes: 0 }
    }

    /// Flush the inner writer; returns it with the sum of everything written.
    pub fn finish(mut self) -> std::io::Result<(W, FileSum)> {
        self.inner.flush()?;
        Ok((self.inner, FileSum { bytes: self.bytes, hash: self.state.hex() }))
    }
}

impl<W: Write> Write for Summed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.state.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Create `path` and write it through `fill`, returning its sum. The file is synced to disk.
pub fn write_summed(path: &Path, algo: Algo, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<FileSum> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = Summed::new(std::io::BufWriter::with_capacity(8 << 20, file), algo);
    fill(&mut w).with_context(|| format!("cannot write {}", path.display()))?;
    let (buf, sum) = w.finish().with_context(|| format!("cannot write {}", path.display()))?;
    let file =
        buf.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(sum)
}

/// Read `path` once and sum it.
pub fn file_sum(path: &Path, algo: Algo) -> Result<FileSum> {
    sum_with_progress(path, algo, &|_| {})
}

/// [`file_sum`], telling `progress` the length of each piece as it is read.
fn sum_with_progress(path: &Path, algo: Algo, progress: &(dyn Fn(u64) + Sync)) -> Result<FileSum> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (mut state, mut bytes) = (algo.hasher(), 0u64);
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        state.update(&buf[..n]);
        bytes += n as u64;
        progress(n as u64);
    }
    Ok(FileSum { bytes, hash: state.hex() })
}

/// One file a folder should hold: its name, and its length and checksum where recorded.
#[derive(Clone, Debug)]
pub struct Expected {
    pub name: String,
    pub bytes: Option<u64>,
    pub hash: Option<String>,
}

/// What [`check_files`] found of one [`Expected`] file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Length and checksum as recorded (or only the length, where no checksum was recorded).
    Ok {
        bytes: u64,
    },
    Missing,
    Size {
        found: u64,
        expected: u64,
    },
    Hash {
        found: String,
        expected: String,
    },
    Unreadable(String),
}

impl Verdict {
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Ok { .. })
    }

    /// One line naming `name`, what was found and what was recorded.
    pub fn describe(&self, name: &str, algo: Algo) -> String {
        match self {
            Verdict::Ok { bytes } => format!("{name}: ok ({bytes} bytes)"),
            Verdict::Missing => format!("{name}: missing"),
            Verdict::Size { found, expected } => {
                format!("{name}: {found} bytes, {expected} recorded (truncated or extended)")
            }
            Verdict::Hash { found, expected } => {
                format!(
                    "{name}: {algo} checksum is {found}, {expected} recorded (the file changed after it was written)"
                )
            }
            Verdict::Unreadable(e) => format!("{name}: cannot be read: {e}"),
        }
    }
}

fn check_one(dir: &Path, f: &Expected, algo: Algo, progress: &(dyn Fn(u64) + Sync)) -> Verdict {
    let path = dir.join(&f.name);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Verdict::Missing,
        Err(e) => return Verdict::Unreadable(e.to_string()),
    };
    if let Some(expected) = f.bytes.filter(|&b| b != len) {
        return Verdict::Size { found: len, expected };
    }
    let Some(expected) = &f.hash else { return Verdict::Ok { bytes: len } };
    match sum_with_progress(&path, algo, progress) {
        Ok(sum) if &sum.hash == expected => Verdict::Ok { bytes: sum.bytes },
        Ok(sum) => Verdict::Hash { found: sum.hash, expected: expected.clone() },
        Err(e) => Verdict::Unreadable(format!("{e:#}")),
    }
}

/// Check `files` of `dir` on up to `threads` threads at once (a parallel file system serves
/// several readers faster than one), telling `progress` each piece's length as it is read;
/// verdicts in the order of `files`.
pub fn check_files(
    dir: &Path,
    files: &[Expected],
    algo: Algo,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Vec<Verdict> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let verdicts = std::sync::Mutex::new(vec![Verdict::Missing; files.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, files.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(f) = files.get(i) else { break };
                let v = check_one(dir, f, algo, progress);
                verdicts.lock().unwrap()[i] = v;
            });
        }
    });
    verdicts.into_inner().unwrap()
}

/// `sums` as `sha256sum` writes them (`HEX  NAME` per line), which `sha256sum -c` checks.
pub fn sums_text<'a>(sums: impl IntoIterator<Item = (&'a String, &'a FileSum)>) -> String {
    sums.into_iter().map(|(name, s)| format!("{}  {name}\n", s.hash)).collect()
}

/// The (name, checksum) lines of a `sha256sum`-style file.
pub fn parse_sums_text(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let Some((hash, name)) = line.split_once(' ') else {
            bail!("line {}: {line:?} is not `CHECKSUM  NAME`", i + 1);
        };
        // Text mode writes two spaces, binary mode ` *NAME`.
        let name = name.strip_prefix(' ').or_else(|| name.strip_prefix('*')).unwrap_or(name);
        if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_hexdigit()) || name.is_empty() {
            bail!("line {}: {line:?} is not `CHECKSUM  NAME`", i + 1);
        }
        out.push((name.to_string(), hash.to_ascii_lowercase()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Reference values: `xxhsum -H3` and `sha256sum` of the same bytes.
        let empty = |algo| {
            let (_, s) = Summed::new(Vec::new(), algo).finish().unwrap();
            s.hash
        };
        assert_eq!(empty(Algo::Xxh3), "2d06800538d394c2");
        assert_eq!(empty(Algo::Sha256), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let mut w = Summed::new(Vec::new(), Algo::Sha256);
        w.write_all(b"abc").unwrap();
        let (out, s) = w.finish().unwrap();
        assert_eq!(out, b"abc");
        assert_eq!((s.bytes, s.hash.as_str()), (3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    }

    #[test]
    fn a_written_file_sums_the_same_when_read_and_a_flipped_bit_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 2_654_435_761) as u8).collect();
        for algo in [Algo::Xxh3, Algo::Sha256] {
            // Written in uneven pieces: the sum does not depend on how the writes were cut.
            let written = write_summed(&p, algo, |w| {
                for piece in data.chunks(777_777) {
                    w.write_all(piece)?;
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(written, file_sum(&p, algo).unwrap());
            assert_eq!(written.bytes, data.len() as u64);
            let mut bytes = std::fs::read(&p).unwrap();
            bytes[1_234_567] ^= 0x10;
            std::fs::write(&p, bytes).unwrap();
            assert_ne!(file_sum(&p, algo).unwrap().hash, written.hash, "{algo}");
        }
    }

    #[test]
    fn check_files_names_each_kind_of_damage() {
        let dir = tempfile::tempdir().unwrap();
        let sum = |name: &str, bytes: &[u8]| {
            let s = write_summed(&dir.path().join(name), Algo::Xxh3, |w| Ok(w.write_all(bytes)?)).unwrap();
            Expected { name: name.into(), bytes: Some(s.bytes), hash: Some(s.hash) }
        };
        let files = vec![
            sum("good", b"good bytes"),
            sum("flipped", b"flipped bytes"),
            sum("short", b"short bytes"),
            sum("gone", b"gone"),
            Expected { name: "old-style".into(), bytes: Some(3), hash: None },
        ];
        std::fs::write(dir.path().join("flipped"), b"flipped bytez").unwrap();
        std::fs::write(dir.path().join("short"), b"short").unwrap();
        std::fs::remove_file(dir.path().join("gone")).unwrap();
        std::fs::write(dir.path().join("old-style"), b"abc").unwrap();
        let read = std::sync::atomic::AtomicU64::new(0);
        let v = check_files(dir.path(), &files, Algo::Xxh3, 3, &|n| {
            read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(v[0], Verdict::Ok { bytes: 10 });
        assert!(matches!(&v[1], Verdict::Hash { expected, .. } if *expected == files[1].hash.clone().unwrap()));
        assert_eq!(v[2], Verdict::Size { found: 5, expected: 11 });
        assert_eq!(v[3], Verdict::Missing);
        assert_eq!(v[4], Verdict::Ok { bytes: 3 });
        assert!(v[1].describe("flipped", Algo::Xxh3).contains("xxh3-64 checksum is"));
        assert_eq!(
            read.into_inner(),
            10 + 13,
            "the summed files' bytes were reported (lengths-only and bad sizes unread)"
        );
    }

    #[test]
    fn sums_text_is_what_sha256sum_reads() {
        let sums = std::collections::BTreeMap::from([
            ("a.json".to_string(), FileSum { bytes: 1, hash: "ab".repeat(32) }),
            ("m-1.safetensors".to_string(), FileSum { bytes: 2, hash: "cd".repeat(32) }),
        ]);
        let text = sums_text(&sums);
        assert_eq!(text, format!("{}  a.json\n{}  m-1.safetensors\n", "ab".repeat(32), "cd".repeat(32)));
        let back = parse_sums_text(&text).unwrap();
        assert_eq!(back[1], ("m-1.safetensors".to_string(), "cd".repeat(32)));
        assert_eq!(parse_sums_text("ABCD *bin.file\n").unwrap()[0], ("bin.file".to_string(), "abcd".to_string()));
        assert!(parse_sums_text("not a line\n").is_err());
    }
}
