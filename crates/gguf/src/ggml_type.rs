//! The ggml tensor element types a GGUF file can name, with their block layouts.

use std::fmt;

/// A ggml tensor type, as stored in a GGUF tensor info (`enum ggml_type` in `ggml.h`).
///
/// Every type llama.cpp has defined is named, so that errors can say what a file holds even when
/// this crate cannot dequantize it; ids this crate has never heard of become [`GgmlType::Unknown`].
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    /// A type id this crate does not know.
    Unknown(u32),
}

/// `(id, type, elements per block, bytes per block)`, as in gguf-py's `GGML_QUANT_SIZES`.
const TABLE: &[(u32, GgmlType, u64, u64)] = &[
    (0, GgmlType::F32, 1, 4),
    (1, GgmlType::F16, 1, 2),
    (2, GgmlType::Q4_0, 32, 18),
    (3, GgmlType::Q4_1, 32, 20),
    (6, GgmlType::Q5_0, 32, 22),
    (7, GgmlType::Q5_1, 32, 24),
    (8, GgmlType::Q8_0, 32, 34),
    (9, GgmlType::Q8_1, 32, 40),
    (10, GgmlType::Q2_K, 256, 84),
    (11, GgmlType::Q3_K, 256, 110),
    (12, GgmlType::Q4_K, 256, 144),
    (13, GgmlType::Q5_K, 256, 176),
    (14, GgmlType::Q6_K, 256, 210),
    (15, GgmlType::Q8_K, 256, 292),
    (16, GgmlType::IQ2_XXS, 256, 66),
    (17, GgmlType::IQ2_XS, 256, 74),
    (18, GgmlType::IQ3_XXS, 256, 98),
    (19, GgmlType::IQ1_S, 256, 50),
    (20, GgmlType::IQ4_NL, 32, 18),
    (21, GgmlType::IQ3_S, 256, 110),
    (22, GgmlType::IQ2_S, 256, 82),
    (23, GgmlType::IQ4_XS, 256, 136),
    (24, GgmlType::I8, 1, 1),
    (25, GgmlType::I16, 1, 2),
    (26, GgmlType::I32, 1, 4),
    (27, GgmlType::I64, 1, 8),
    (28, GgmlType::F64, 1, 8),
    (29, GgmlType::IQ1_M, 256, 56),
    (30, GgmlType::BF16, 1, 2),
    (34, GgmlType::TQ1_0, 256, 54),
    (35, GgmlType::TQ2_0, 256, 66),
    (39, GgmlType::MXFP4, 32, 17),
    (40, GgmlType::NVFP4, 64, 36),
    (41, GgmlType::Q1_0, 128, 18),
];

/// The types [`crate::dequantize`] can turn into `f32`.
pub const DEQUANTIZABLE: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F64,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    /// The type with this GGUF id.
    pub fn from_id(id: u32) -> Self {
        TABLE.iter().find(|row| row.0 == id).map_or(GgmlType::Unknown(id), |row| row.1)
    }

    /// The id GGUF stores for this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Unknown(id) => id,
            known => TABLE.iter().find(|row| row.1 == known).map(|row| row.0).expect("every named type is in TABLE"),
        }
    }

    /// `(elements per block, bytes per block)`; `None` for an unknown type.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        TABLE.iter().find(|row| row.1 == self).map(|row| (row.2, row.3))
    }

    /// The number of bytes `n_elements` values of this type take, or `None` when the type is
    /// unknown or `n_elements` is not a whole number of blocks.
    pub fn byte_size(self, n_elements: u64) -> Option<u64> {
        let (block, bytes) = self.block_layout()?;
        if n_elements % block != 0 {
            return None;
        }
        (n_elements / block).checked_mul(bytes)
    }

    /// Whether [`crate::dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        DEQUANTIZABLE.contains(&self)
    }

    /// The name ggml uses (`"Q4_K"`, `"BF16"`, ...).
    pub fn name(self) -> String {
        match self {
            GgmlType::Unknown(id) => format!("unknown type {id}"),
            known => format!("{known:?}"),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// `"F32, F16, ..."`: the dequantizable types, for error messages.
pub fn dequantizable_list() -> String {
    DEQUANTIZABLE.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for &(id, ty, _, _) in TABLE {
            assert_eq!(GgmlType::from_id(id), ty);
            assert_eq!(ty.id(), id);
        }
        assert_eq!(GgmlType::from_id(4), GgmlType::Unknown(4));
        assert_eq!(GgmlType::Unknown(4).id(), 4);
    }

    #[test]
    fn names_match_ggml() {
        assert_eq!(GgmlType::Q4_K.name(), "Q4_K");
        assert_eq!(GgmlType::IQ2_XXS.name(), "IQ2_XXS");
        assert_eq!(GgmlType::Unknown(99).name(), "unknown type 99");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(GgmlType::Q4_1.byte_size(64), Some(40));
        assert_eq!(GgmlType::Q4_1.byte_size(48), None);
        assert_eq!(GgmlType::F16.byte_size(3), Some(6));
        assert_eq!(GgmlType::Unknown(99).byte_size(32), None);
    }
}
