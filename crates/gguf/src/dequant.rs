//! Dequantization of ggml tensor data to `f32`.
//!
//! Every kernel follows the block layouts and the arithmetic of gguf-py's `quants.py` (the
//! reference llama.cpp ships for Python) operation by operation, in `f32` and without fused
//! multiply-adds, so the results are bit-identical to `gguf.quants.dequantize`.

use half::f16;

use crate::ggml_type::{dequantizable_list, GgmlType};

/// Why some bytes cannot be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("ggml type {ty} cannot be dequantized (supported types: {supported})", supported = dequantizable_list())]
    UnsupportedType { ty: GgmlType },
    #[error("{n_elements} elements are not a whole number of {ty} blocks of {block} elements")]
    PartialBlock { ty: GgmlType, n_elements: usize, block: usize },
    #[error("{n_elements} elements of {ty} take {expected} bytes, but {actual} bytes were given")]
    ByteCount { ty: GgmlType, n_elements: usize, expected: usize, actual: usize },
}

/// Dequantizes `n_elements` values of type `ty` stored in `data`.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, DequantError> {
    Ok(Dequantizer::new(ty, data, n_elements)?.to_vec())
}

/// Checked tensor data, ready to be dequantized.
///
/// Creating one does every check ([`DequantError`]); dequantizing it afterwards cannot fail. The
/// import builds one per tensor before it writes anything, so a bad tensor stops it early.
#[derive(Clone, Copy)]
pub struct Dequantizer<'a> {
    data: &'a [u8],
    n_elements: usize,
    kernel: Kernel,
}

impl std::fmt::Debug for Dequantizer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dequantizer")
            .field("bytes", &self.data.len())
            .field("n_elements", &self.n_elements)
            .field("block_elements", &self.kernel.block_elements)
            .finish()
    }
}

impl<'a> Dequantizer<'a> {
    /// Checks that `data` holds exactly `n_elements` values of a supported type `ty`.
    pub fn new(ty: GgmlType, data: &'a [u8], n_elements: usize) -> Result<Self, DequantError> {
        let kernel = Kernel::for_type(ty).ok_or(DequantError::UnsupportedType { ty })?;
        if n_elements % kernel.block_elements != 0 {
            return Err(DequantError::PartialBlock { ty, n_elements, block: kernel.block_elements });
        }
        let expected = n_elements / kernel.block_elements * kernel.block_bytes;
        if data.len() != expected {
            return Err(DequantError::ByteCount { ty, n_elements, expected, actual: data.len() });
        }
        Ok(Self { data, n_elements, kernel })
    }

    /// The number of values this dequantizes to.
    pub fn n_elements(&self) -> usize {
        self.n_elements
    }

    /// Dequantizes into a new vector.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n_elements];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantizes into `out`, which must hold exactly [`Self::n_elements`] values. Large tensors
    /// are split across the available cores.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.n_elements, "output length must equal the element count");
        let Kernel { block_elements, block_bytes, run } = self.kernel;
        let n_blocks = self.n_elements / block_elements;
        // Below about a million values a thread costs more than it saves.
        const MIN_BLOCKS_PER_THREAD: usize = 1 << 15;
        let threads = available_threads().min(n_blocks / MIN_BLOCKS_PER_THREAD).max(1);
        if threads == 1 {
            run(self.data, out);
            return;
        }
        let blocks_per_thread = n_blocks.div_ceil(threads);
        std::thread::scope(|scope| {
            let sources = self.data.chunks(blocks_per_thread * block_bytes);
            let targets = out.chunks_mut(blocks_per_thread * block_elements);
            for (src, dst) in sources.zip(targets) {
                scope.spawn(move || run(src, dst));
            }
        });
    }
}

fn available_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A block kernel: dequantizes whole blocks from `src` into `dst`.
#[derive(Clone, Copy)]
struct Kernel {
    block_elements: usize,
    block_bytes: usize,
    run: fn(&[u8], &mut [f32]),
}

impl Kernel {
    fn for_type(ty: GgmlType) -> Option<Kernel> {
        let run: fn(&[u8], &mut [f32]) = match ty {
            GgmlType::F32 => f32_,
            GgmlType::F16 => f16_,
            GgmlType::BF16 => bf16_,
            GgmlType::F64 => f64_,
            GgmlType::Q4_0 => q4_0,
            GgmlType::Q4_1 => q4_1,
            GgmlType::Q5_0 => q5_0,
            GgmlType::Q5_1 => q5_1,
            GgmlType::Q8_0 => q8_0,
            GgmlType::Q2_K => q2_k,
            GgmlType::Q3_K => q3_k,
            GgmlType::Q4_K => q4_k,
            GgmlType::Q5_K => q5_k,
            GgmlType::Q6_K => q6_k,
            _ => return None,
        };
        let (block_elements, block_bytes) = ty.block_layout()?;
        Some(Kernel { block_elements: block_elements as usize, block_bytes: block_bytes as usize, run })
    }
}

/// Runs `f` over each `BYTES`-byte block of `src` and the matching `ELEMS` values of `dst`.
#[inline(always)]
fn blocks<const BYTES: usize, const ELEMS: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: impl Fn(&[u8; BYTES], &mut [f32; ELEMS]),
) {
    debug_assert_eq!(src.len() / BYTES, dst.len() / ELEMS);
    for (block, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(ELEMS)) {
        f(block.try_into().unwrap(), out.try_into().unwrap());
    }
}

#[inline(always)]
fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

fn f32_(src: &[u8], dst: &mut [f32]) {
    blocks::<4, 1>(src, dst, |b, o| o[0] = f32::from_le_bytes(*b));
}

fn f16_(src: &[u8], dst: &mut [f32]) {
    blocks::<2, 1>(src, dst, |b, o| o[0] = f16::from_bits(u16::from_le_bytes(*b)).to_f32());
}

fn bf16_(src: &[u8], dst: &mut [f32]) {
    blocks::<2, 1>(src, dst, |b, o| o[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16));
}

fn f64_(src: &[u8], dst: &mut [f32]) {
    blocks::<8, 1>(src, dst, |b, o| o[0] = f64::from_le_bytes(*b) as f32);
}

/// Q4_0: `d: f16, qs: [u8; 16]`; value `j` is nibble `j % 16` (low nibbles first), minus 8, times `d`.
fn q4_0(src: &[u8], dst: &mut [f32]) {
    blocks::<18, 32>(src, dst, |b, o| {
        let d = half_at(b, 0);
        for (j, &q) in b[2..].iter().enumerate() {
            o[j] = d * ((q & 0x0F) as i32 - 8) as f32;
            o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
        }
    });
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; value = `d * nibble + m`.
fn q4_1(src: &[u8], dst: &mut [f32]) {
    blocks::<20, 32>(src, dst, |b, o| {
        let d = half_at(b, 0);
        let m = half_at(b, 2);
        for (j, &q) in b[4..].iter().enumerate() {
            o[j] = d * (q & 0x0F) as f32 + m;
            o[j + 16] = d * (q >> 4) as f32 + m;
        }
    });
}

/// The 5-bit values of a Q5_0/Q5_1 block: nibbles from `qs`, fifth bit `j` of `qh` for value `j`.
#[inline(always)]
fn five_bit(qh: u32, qs: &[u8], j: usize) -> u8 {
    let low = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
    low | ((((qh >> j) & 1) as u8) << 4)
}

/// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; value = `d * (q - 16)`.
fn q5_0(src: &[u8], dst: &mut [f32]) {
    blocks::<22, 32>(src, dst, |b, o| {
        let d = half_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..];
        for (j, out) in o.iter_mut().enumerate() {
            *out = d * (five_bit(qh, qs, j) as i32 - 16) as f32;
        }
    });
}

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; value = `d * q + m`.
fn q5_1(src: &[u8], dst: &mut [f32]) {
    blocks::<24, 32>(src, dst, |b, o| {
        let d = half_at(b, 0);
        let m = half_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..];
        for (j, out) in o.iter_mut().enumerate() {
            *out = d * five_bit(qh, qs, j) as f32 + m;
        }
    });
}

/// Q8_0: `d: f16, qs: [i8; 32]`; value = `q * d`.
fn q8_0(src: &[u8], dst: &mut [f32]) {
    blocks::<34, 32>(src, dst, |b, o| {
        let d = half_at(b, 0);
        for (out, &q) in o.iter_mut().zip(&b[2..]) {
            *out = (q as i8) as f32 * d;
        }
    });
}

/// Q2_K: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`. Sixteen sub-blocks of 16; each
/// scale byte holds a 4-bit scale (low) and a 4-bit min (high).
fn q2_k(src: &[u8], dst: &mut [f32]) {
    blocks::<84, 256>(src, dst, |b, o| {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let d = half_at(b, 80);
        let dmin = half_at(b, 82);
        for (i, out) in o.iter_mut().enumerate() {
            let sc = scales[i / 16];
            let dl = d * (sc & 0x0F) as f32;
            let ml = dmin * (sc >> 4) as f32;
            let (chunk, j) = (i / 128, i % 128);
            let q = (qs[chunk * 32 + j % 32] >> (2 * (j / 32))) & 3;
            *out = dl * q as f32 - ml;
        }
    });
}

/// Q3_K: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`. Sixteen sub-blocks of 16
/// with 6-bit signed scales; a value's third bit is stored inverted in `hmask`.
fn q3_k(src: &[u8], dst: &mut [f32]) {
    blocks::<110, 256>(src, dst, |b, o| {
        let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
        let d = half_at(b, 108);
        let mut dl = [0f32; 16];
        for (j, dl) in dl.iter_mut().enumerate() {
            let low = if j < 8 { packed[j] & 0x0F } else { packed[j - 8] >> 4 };
            let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
            *dl = d * ((low | (high << 4)) as i8 - 32) as f32;
        }
        for (i, out) in o.iter_mut().enumerate() {
            let (chunk, j) = (i / 128, i % 128);
            let low = ((qs[chunk * 32 + j % 32] >> (2 * (j / 32))) & 3) as i8;
            let high = ((hmask[i % 32] >> (i / 32)) & 1) ^ 1;
            *out = dl[i / 16] * (low - ((high << 2) as i8)) as f32;
        }
    });
}

/// The eight 6-bit scales and mins packed into the 12 bytes of a Q4_K/Q5_K block.
#[inline(always)]
fn k_scales_mins(p: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = p[j] & 0x3F;
        mn[j] = p[j + 4] & 0x3F;
        sc[j + 4] = (p[j + 8] & 0x0F) | ((p[j] >> 2) & 0x30);
        mn[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Eight sub-blocks of 32; each
/// 32-byte chunk of `qs` holds two sub-blocks, low nibbles first.
fn q4_k(src: &[u8], dst: &mut [f32]) {
    blocks::<144, 256>(src, dst, |b, o| {
        let d = half_at(b, 0);
        let dmin = half_at(b, 2);
        let (sc, mn) = k_scales_mins(&b[4..16]);
        let qs = &b[16..];
        for (s, out) in o.chunks_exact_mut(32).enumerate() {
            let scale = d * sc[s] as f32;
            let min = dmin * mn[s] as f32;
            let (bytes, shift) = (&qs[(s / 2) * 32..(s / 2) * 32 + 32], 4 * (s % 2));
            for (out, &q) in out.iter_mut().zip(bytes) {
                *out = scale * ((q >> shift) & 0x0F) as f32 - min;
            }
        }
    });
}

/// Q5_K: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`; like Q4_K, with
/// bit `s` of `qh[l]` the fifth bit of value `l` of sub-block `s`.
fn q5_k(src: &[u8], dst: &mut [f32]) {
    blocks::<176, 256>(src, dst, |b, o| {
        let d = half_at(b, 0);
        let dmin = half_at(b, 2);
        let (sc, mn) = k_scales_mins(&b[4..16]);
        let (qh, qs) = (&b[16..48], &b[48..]);
        for (s, out) in o.chunks_exact_mut(32).enumerate() {
            let scale = d * sc[s] as f32;
            let min = dmin * mn[s] as f32;
            let (bytes, shift) = (&qs[(s / 2) * 32..(s / 2) * 32 + 32], 4 * (s % 2));
            for (l, out) in out.iter_mut().enumerate() {
                let q = ((bytes[l] >> shift) & 0x0F) | (((qh[l] >> s) & 1) << 4);
                *out = scale * q as f32 - min;
            }
        }
    });
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Sixteen sub-blocks of 16;
/// values are 6-bit, stored as a nibble in `ql` and two bits in `qh`, offset by 32.
fn q6_k(src: &[u8], dst: &mut [f32]) {
    blocks::<210, 256>(src, dst, |b, o| {
        let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
        let d = half_at(b, 208);
        for (i, out) in o.iter_mut().enumerate() {
            let (half, j) = (i / 128, i % 128);
            let low = (ql[half * 64 + j % 64] >> (4 * (j / 64))) & 0x0F;
            let high = (qh[half * 32 + j % 32] >> (2 * (j / 32))) & 3;
            let q = (low | (high << 4)) as i8 - 32;
            *out = (d * (scales[i / 16] as i8) as f32) * q as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut block = h(0.5).to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let out = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_and_q4_1_nibble_order() {
        // Byte j holds value j (low nibble) and value j + 16 (high nibble).
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut q40 = h(2.0).to_vec();
        q40.extend(&qs);
        let out = dequantize(GgmlType::Q4_0, &q40, 32).unwrap();
        assert_eq!(out[3], 2.0 * (3.0 - 8.0));
        assert_eq!(out[16 + 3], 2.0 * (12.0 - 8.0));

        let mut q41 = h(0.25).to_vec();
        q41.extend(h(-1.0));
        q41.extend(&qs);
        let out = dequantize(GgmlType::Q4_1, &q41, 32).unwrap();
        assert_eq!(out[5], 0.25 * 5.0 - 1.0);
        assert_eq!(out[16 + 5], 0.25 * 10.0 - 1.0);
    }

    #[test]
    fn q5_high_bits() {
        let mut block = h(1.0).to_vec();
        block.extend(0x8000_0001u32.to_le_bytes()); // fifth bit set for values 0 and 31
        block.extend([0u8; 16]);
        let out = dequantize(GgmlType::Q5_0, &block, 32).unwrap();
        assert_eq!(out[0], 0.0);
        assert_eq!(out[1], -16.0);
        assert_eq!(out[31], 0.0);
    }

    #[test]
    fn rejects_bad_sizes_and_types() {
        assert_eq!(
            dequantize(GgmlType::Q8_0, &[0; 33], 32),
            Err(DequantError::ByteCount { ty: GgmlType::Q8_0, n_elements: 32, expected: 34, actual: 33 })
        );
        assert!(matches!(dequantize(GgmlType::Q4_0, &[0; 18], 31), Err(DequantError::PartialBlock { .. })));
        let err = dequantize(GgmlType::IQ2_XXS, &[0; 66], 256).unwrap_err();
        assert!(err.to_string().contains("IQ2_XXS"), "{err}");
        assert!(err.to_string().contains("Q4_K"), "{err}");
    }

    #[test]
    fn threaded_matches_single_block_runs() {
        // Enough blocks to take the threaded path; each block differs.
        let n_blocks = 1 << 17;
        let mut data = Vec::with_capacity(n_blocks * 34);
        for b in 0..n_blocks {
            data.extend(h((b % 97) as f32 / 64.0));
            data.extend((0..32).map(|i| ((b + i) % 251) as u8));
        }
        let all = dequantize(GgmlType::Q8_0, &data, n_blocks * 32).unwrap();
        for b in [0, 1, n_blocks / 2, n_blocks - 1] {
            let one = dequantize(GgmlType::Q8_0, &data[b * 34..(b + 1) * 34], 32).unwrap();
            assert_eq!(&all[b * 32..(b + 1) * 32], &one[..]);
        }
    }
}
