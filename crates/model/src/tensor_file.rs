//! Writing tensors as a safetensors file, summed on the way to disk.
//!
//! The one writer behind checkpoints and exports. The header is the safetensors crate's own
//! (`Metadata`, tensors ordered by dtype then name, padded to 8 bytes, as `serialize_to_file`
//! lays them out), so every safetensors reader opens the result; each tensor is copied to the CPU
//! only when its turn comes, so a model on a GPU never needs a whole CPU copy at once.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use longmix_core::checksum::{write_summed, Algo, FileSum};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

/// The safetensors dtype of a LibTorch kind.
pub fn safetensors_dtype(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        k => bail!("cannot write a {k:?} tensor as safetensors"),
    })
}

/// Write `tensors` (any device) to `path` with `metadata`, each converted to `kind` when given;
/// returns the file's length and `algo` checksum, taken from the bytes as they were written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    kind: Option<Kind>,
    metadata: Option<HashMap<String, String>>,
    algo: Algo,
) -> Result<FileSum> {
    let kind_of = |t: &Tensor| kind.unwrap_or_else(|| t.kind());
    let mut order: Vec<(Dtype, &String, &Tensor)> =
        tensors.iter().map(|(n, t)| Ok((safetensors_dtype(kind_of(t))?, n, t))).collect::<Result<_>>()?;
    // As safetensors' `serialize`: the largest alignment first, then by name.
    order.sort_by(|(ld, ln, _), (rd, rn, _)| rd.cmp(ld).then(ln.cmp(rn)));
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(order.len());
    for (dtype, name, t) in &order {
        let bytes = t.numel() * kind_of(t).elt_size_in_bytes();
        let shape = t.size().iter().map(|&d| d as usize).collect();
        infos.push(((*name).clone(), TensorInfo { dtype: *dtype, shape, data_offsets: (offset, offset + bytes) }));
        offset += bytes;
    }
    let mut header = serde_json::to_string(&Metadata::new(metadata, infos)?)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    write_summed(path, algo, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, _, t) in &order {
            let cpu = t.detach().to_device(Device::Cpu).to_kind(kind_of(t)).contiguous();
            w.write_all(tensor_bytes(&cpu))?;
        }
        Ok(())
    })
}

/// The bytes of a contiguous CPU tensor, borrowed.
fn tensor_bytes(t: &Tensor) -> &[u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: `t` is a contiguous CPU tensor (the caller made it so) holding `len` bytes from
    // its data pointer, and it outlives the borrow.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longmix_core::checksum::file_sum;

    #[test]
    fn the_file_reads_back_and_its_sum_is_that_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let tensors = vec![
            ("b.weight".to_string(), Tensor::randn([3, 5], (Kind::Float, Device::Cpu)).transpose(0, 1)),
            ("a.step".to_string(), Tensor::from_slice(&[7i64])),
            ("c.half".to_string(), Tensor::randn([4], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)),
            ("d.empty".to_string(), Tensor::zeros([0, 4], (Kind::Float, Device::Cpu))),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let sum = write_safetensors(&path, &tensors, None, Some(meta), Algo::Xxh3).unwrap();
        assert_eq!(sum, file_sum(&path, Algo::Xxh3).unwrap());
        let back: HashMap<String, Tensor> = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
        for (name, t) in &tensors {
            assert!(back[name].equal(t), "{name}");
            assert_eq!(back[name].kind(), t.kind(), "{name}");
        }
        // The layout is the safetensors crate's own: its serializer writes the same bytes.
        let f32_data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, t)| {
                let c = t.contiguous();
                tensor_bytes(&c).to_vec()
            })
            .collect();
        let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&f32_data)
            .map(|((n, t), d)| {
                let shape = t.size().iter().map(|&s| s as usize).collect();
                (
                    n.as_str(),
                    safetensors::tensor::TensorView::new(safetensors_dtype(t.kind()).unwrap(), shape, d).unwrap(),
                )
            })
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        assert_eq!(safetensors::serialize(views, Some(meta)).unwrap(), std::fs::read(&path).unwrap());
    }

    #[test]
    fn converts_to_the_kind_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = Tensor::randn([8], (Kind::Float, Device::Cpu));
        write_safetensors(&path, &[("w".into(), t.shallow_clone())], Some(Kind::BFloat16), None, Algo::Sha256).unwrap();
        let back = Tensor::read_safetensors(&path).unwrap();
        assert_eq!(back[0].1.kind(), Kind::BFloat16);
        assert!(back[0].1.equal(&t.to_kind(Kind::BFloat16)));
    }
}
