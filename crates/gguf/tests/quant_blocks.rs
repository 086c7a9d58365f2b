//! Every dequantization kernel against gguf-py on random blocks
//! (tests/fixtures/smollm2/quant_blocks_reference.json, made by make_smollm2_reference.py).

mod common;

use longmix_gguf::{dequantize, GgmlType, DEQUANTIZABLE};

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn type_named(name: &str) -> GgmlType {
    (0..64).map(GgmlType::from_id).find(|t| t.name() == name).unwrap_or_else(|| panic!("no ggml type {name}"))
}

#[test]
fn kernels_match_gguf_py_bit_for_bit() {
    let reference = common::read_json(&common::fixtures().join("quant_blocks_reference.json"));
    let mut covered = vec![GgmlType::F32, GgmlType::F64]; // trivial, not in the fixture
    for case in reference["cases"].as_array().unwrap() {
        let ty = type_named(case["ggml_type"].as_str().unwrap());
        let n = case["n_elements"].as_u64().unwrap() as usize;
        let bytes = unhex(case["bytes_hex"].as_str().unwrap());
        let expected: Vec<f32> = unhex(case["values_hex"].as_str().unwrap())
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got = dequantize(ty, &bytes, n).unwrap();
        assert_eq!(got.len(), expected.len(), "{ty}");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(g.to_bits() == e.to_bits(), "{ty}[{i}]: {g} vs gguf-py {e}");
        }
        covered.push(ty);
    }
    covered.sort();
    let mut supported = DEQUANTIZABLE.to_vec();
    supported.sort();
    assert_eq!(covered, supported, "every supported type is checked");
}
