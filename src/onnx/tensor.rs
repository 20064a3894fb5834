//! Decoding ONNX `TensorProto`s into plain Rust vectors: inline typed fields, `raw_data`
//! (little-endian) and external data files. Only numeric types a CNN classifier uses are decoded;
//! anything else is an error naming the type, never a panic.

use std::path::Path;

use super::pb::{TensorProto, tensor_proto::DataLocation, tensor_proto::DataType};

/// Decoded values, widened to one of three element kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// FLOAT, FLOAT16, BFLOAT16 (widened to f32).
    F32(Vec<f32>),
    /// DOUBLE.
    F64(Vec<f64>),
    /// Every integer type and BOOL (widened to i64).
    I64(Vec<i64>),
}

/// A decoded tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub dims: Vec<usize>,
    pub data_type: DataType,
    pub values: Values,
}

impl TensorData {
    pub fn len(&self) -> usize {
        match &self.values {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
            Values::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f64 (exact for every float kind; integers beyond 2^53 round).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.values {
            Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Values::F64(v) => v.clone(),
            Values::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The values as f32 (what candle and ORT compute with).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.values {
            Values::F32(v) => v.clone(),
            Values::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Values::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// Integer values (shape tensors, axes); None for float tensors.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.values {
            Values::I64(v) => Some(v),
            _ => None,
        }
    }
}

/// Lower-case, numpy-like name of an ONNX element type (`float32`, `int64`, ...).
pub fn type_name(data_type: i32) -> String {
    match DataType::try_from(data_type) {
        Ok(DataType::Float) => "float32".into(),
        Ok(DataType::Double) => "float64".into(),
        Ok(DataType::Float16) => "float16".into(),
        Ok(DataType::Bfloat16) => "bfloat16".into(),
        Ok(t) => t.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("unknown({data_type})"),
    }
}

/// Bytes per element as stored (4-bit types count as one byte per two elements, rounded up by the caller).
pub fn element_bits(data_type: DataType) -> Option<usize> {
    use DataType::*;
    Some(match data_type {
        Float | Int32 | Uint32 => 32,
        Double | Int64 | Uint64 | Complex64 => 64,
        Complex128 => 128,
        Float16 | Bfloat16 | Int16 | Uint16 => 16,
        Int8 | Uint8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz => 8,
        Int4 | Uint4 | Float4e2m1 => 4,
        String | Undefined => return None,
    })
}

/// Number of elements a tensor declares (product of dims; 1 for a scalar).
pub fn numel(t: &TensorProto) -> usize {
    t.dims.iter().map(|&d| d.max(0) as usize).product()
}

/// Whether the tensor keeps its bytes in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

/// The external-data entry `key` of a tensor, if any.
pub fn external_entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// Reads the external bytes of a tensor; `model_dir` is the folder of the .onnx file.
pub fn read_external(t: &TensorProto, model_dir: &Path) -> Result<Vec<u8>, String> {
    let location = external_entry(t, "location").ok_or("external data has no 'location' entry")?;
    let loc = Path::new(location);
    if loc.is_absolute()
        || loc
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "external data location '{location}' must be a relative path inside the model's folder"
        ));
    }
    let parse = |key: &str| -> Result<Option<usize>, String> {
        external_entry(t, key)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("external data {key} '{v}' is not a number"))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?;
    let file = model_dir.join(loc);
    let cannot = |e: std::io::Error| {
        format!(
            "external data file '{}' cannot be read: {e}",
            file.display()
        )
    };
    let mut f = std::fs::File::open(&file).map_err(cannot)?;
    let size = f.metadata().map_err(cannot)?.len() as usize;
    let end = match length {
        Some(l) => offset
            .checked_add(l)
            .ok_or("external data offset+length overflows")?,
        None => size,
    };
    if offset > size || end > size {
        return Err(format!(
            "external data file '{}' has {size} bytes, tensor needs bytes {offset}..{end}",
            file.display()
        ));
    }
    // Read only this tensor's range: one external file often holds every weight.
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = vec![0u8; end - offset];
    f.seek(SeekFrom::Start(offset as u64)).map_err(cannot)?;
    f.read_exact(&mut buf).map_err(cannot)?;
    Ok(buf)
}

/// Decodes a tensor's values. `model_dir` is needed only for external data.
pub fn decode(t: &TensorProto, model_dir: Option<&Path>) -> Result<TensorData, String> {
    let data_type = DataType::try_from(t.data_type)
        .map_err(|_| format!("unknown element type {}", t.data_type))?;
    if let Some(d) = t.dims.iter().find(|&&d| d < 0) {
        return Err(format!("negative dimension {d}"));
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n = numel(t);
    let external;
    let raw: Option<&[u8]> = if is_external(t) {
        let dir = model_dir.ok_or("tensor uses external data but the model's folder is unknown")?;
        external = read_external(t, dir)?;
        Some(&external)
    } else if !t.raw_data.is_empty() {
        Some(&t.raw_data)
    } else {
        None
    };
    let values = match raw {
        Some(bytes) => decode_raw(data_type, bytes, n)?,
        None => decode_typed(t, data_type)?,
    };
    let got = match &values {
        Values::F32(v) => v.len(),
        Values::F64(v) => v.len(),
        Values::I64(v) => v.len(),
    };
    if got != n {
        return Err(format!(
            "holds {got} values but its shape {:?} needs {n}",
            t.dims
        ));
    }
    Ok(TensorData {
        dims,
        data_type,
        values,
    })
}

fn chunks<const N: usize>(
    bytes: &[u8],
    n: usize,
) -> Result<impl Iterator<Item = [u8; N]> + '_, String> {
    if bytes.len() != n * N {
        return Err(format!(
            "raw data has {} bytes, expected {} ({n} elements of {N} bytes)",
            bytes.len(),
            n * N
        ));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact yields N bytes")))
}

fn decode_raw(dt: DataType, b: &[u8], n: usize) -> Result<Values, String> {
    use DataType::*;
    Ok(match dt {
        Float => Values::F32(chunks::<4>(b, n)?.map(f32::from_le_bytes).collect()),
        Double => Values::F64(chunks::<8>(b, n)?.map(f64::from_le_bytes).collect()),
        Float16 => Values::F32(
            chunks::<2>(b, n)?
                .map(|c| half::f16::from_le_bytes(c).to_f32())
                .collect(),
        ),
        Bfloat16 => Values::F32(
            chunks::<2>(b, n)?
                .map(|c| half::bf16::from_le_bytes(c).to_f32())
                .collect(),
        ),
        Int8 => Values::I64(chunks::<1>(b, n)?.map(|c| c[0] as i8 as i64).collect()),
        Uint8 | Bool => Values::I64(chunks::<1>(b, n)?.map(|c| c[0] as i64).collect()),
        Int16 => Values::I64(
            chunks::<2>(b, n)?
                .map(|c| i16::from_le_bytes(c) as i64)
                .collect(),
        ),
        Uint16 => Values::I64(
            chunks::<2>(b, n)?
                .map(|c| u16::from_le_bytes(c) as i64)
                .collect(),
        ),
        Int32 => Values::I64(
            chunks::<4>(b, n)?
                .map(|c| i32::from_le_bytes(c) as i64)
                .collect(),
        ),
        Uint32 => Values::I64(
            chunks::<4>(b, n)?
                .map(|c| u32::from_le_bytes(c) as i64)
                .collect(),
        ),
        Int64 => Values::I64(chunks::<8>(b, n)?.map(i64::from_le_bytes).collect()),
        Uint64 => Values::I64(
            chunks::<8>(b, n)?
                .map(|c| i64::try_from(u64::from_le_bytes(c)).unwrap_or(i64::MAX))
                .collect(),
        ),
        Int4 | Uint4 => {
            // Two elements per byte, low nibble first (ONNX packing).
            if b.len() != n.div_ceil(2) {
                return Err(format!(
                    "raw data has {} bytes, expected {} for {n} 4-bit elements",
                    b.len(),
                    n.div_ceil(2)
                ));
            }
            let signed = dt == Int4;
            Values::I64(
                (0..n)
                    .map(|i| {
                        let nib = (b[i / 2] >> ((i % 2) * 4)) & 0xF;
                        if signed && nib >= 8 {
                            nib as i64 - 16
                        } else {
                            nib as i64
                        }
                    })
                    .collect(),
            )
        }
        other => {
            return Err(format!(
                "element type {} is not supported here",
                other.as_str_name()
            ));
        }
    })
}

fn decode_typed(t: &TensorProto, dt: DataType) -> Result<Values, String> {
    use DataType::*;
    Ok(match dt {
        Float => Values::F32(t.float_data.clone()),
        Double => Values::F64(t.double_data.clone()),
        // 16-bit floats are stored as their bit patterns in int32_data.
        Float16 => Values::F32(
            t.int32_data
                .iter()
                .map(|&v| half::f16::from_bits(v as u16).to_f32())
                .collect(),
        ),
        Bfloat16 => Values::F32(
            t.int32_data
                .iter()
                .map(|&v| half::bf16::from_bits(v as u16).to_f32())
                .collect(),
        ),
        Int8 | Uint8 | Int16 | Uint16 | Int32 | Bool => {
            Values::I64(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        Int64 => Values::I64(t.int64_data.clone()),
        Uint32 | Uint64 => Values::I64(
            t.uint64_data
                .iter()
                .map(|&v| i64::try_from(v).unwrap_or(i64::MAX))
                .collect(),
        ),
        other => {
            return Err(format!(
                "element type {} is not supported here",
                other.as_str_name()
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::StringStringEntryProto;

    fn tensor(dt: DataType, dims: &[i64]) -> TensorProto {
        TensorProto {
            data_type: dt as i32,
            dims: dims.to_vec(),
            name: "t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_and_typed_floats_agree() {
        let vals = [1.5f32, -2.0, 0.25, 3.0];
        let mut raw = tensor(DataType::Float, &[2, 2]);
        raw.raw_data = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut typed = tensor(DataType::Float, &[2, 2]);
        typed.float_data = vals.to_vec();
        let a = decode(&raw, None).unwrap();
        let b = decode(&typed, None).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_f32(), vals);
        assert_eq!(a.dims, vec![2, 2]);
    }

    #[test]
    fn half_int_and_int4_decode() {
        let mut h = tensor(DataType::Float16, &[2]);
        h.raw_data = [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(decode(&h, None).unwrap().to_f32(), vec![0.5, -3.0]);

        let mut i = tensor(DataType::Int64, &[3]);
        i.int64_data = vec![i64::MAX, -1, 7];
        assert_eq!(
            decode(&i, None).unwrap().as_i64().unwrap(),
            &[i64::MAX, -1, 7]
        );

        let mut q = tensor(DataType::Int4, &[3]);
        q.raw_data = vec![0x9F, 0x07]; // -1, -7, 7
        assert_eq!(decode(&q, None).unwrap().as_i64().unwrap(), &[-1, -7, 7]);
    }

    #[test]
    fn wrong_sizes_are_errors_not_panics() {
        let mut t = tensor(DataType::Float, &[3]);
        t.raw_data = vec![0; 8];
        assert!(decode(&t, None).unwrap_err().contains("expected 12"));
        let mut t = tensor(DataType::Float, &[3]);
        t.float_data = vec![1.0];
        assert!(decode(&t, None).unwrap_err().contains("needs 3"));
        let t = tensor(DataType::String, &[1]);
        assert!(decode(&t, None).is_err());
        let t = tensor(DataType::Float, &[-1]);
        assert!(decode(&t, None).unwrap_err().contains("negative"));
    }

    #[test]
    fn external_data_with_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; 4];
        bytes.extend([2.0f32, 4.0].iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(dir.path().join("w.bin"), &bytes).unwrap();
        let mut t = tensor(DataType::Float, &[2]);
        t.data_location = Some(DataLocation::External as i32);
        let kv = |k: &str, v: &str| StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        t.external_data = vec![
            kv("location", "w.bin"),
            kv("offset", "4"),
            kv("length", "8"),
        ];
        assert_eq!(
            decode(&t, Some(dir.path())).unwrap().to_f32(),
            vec![2.0, 4.0]
        );
        t.external_data[0].value = "missing.bin".into();
        assert!(
            decode(&t, Some(dir.path()))
                .unwrap_err()
                .contains("missing.bin")
        );
        t.external_data[0].value = "../escape.bin".into();
        assert!(
            decode(&t, Some(dir.path()))
                .unwrap_err()
                .contains("relative path")
        );
    }
}
