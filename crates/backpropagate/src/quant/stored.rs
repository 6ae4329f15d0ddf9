//! ggml blocks kept inside a safetensors file: how a model folder read from a GGUF
//! holds the file's quantized tensors without widening them (a 7B q4_k file stays
//! about 4 GB instead of becoming 28 GB of f32). Tensor `name` holds the raw blocks as
//! U8 of shape (rows, bytes per row), and `name.ggml_type` one U8 with ggml's type id;
//! the logical shape comes from config.json as for any tensor.

use super::GgmlType;

/// The companion tensor that marks `name` as ggml blocks.
pub const TYPE_SUFFIX: &str = ".ggml_type";

/// The weight a companion tensor describes.
pub fn weight_of_type_tensor(name: &str) -> Option<&str> {
    name.strip_suffix(TYPE_SUFFIX)
}

/// The block type a companion tensor holds (U8, one value), if it is one we decode
/// and a blocks type (floats are stored as floats).
pub fn type_of(dtype: safetensors::Dtype, data: &[u8]) -> Result<GgmlType, String> {
    match (dtype, data) {
        (safetensors::Dtype::U8, [id]) => match GgmlType::from_id(*id as u32) {
            Some(t) if t.is_blocks() => Ok(t),
            _ => Err(format!(
                "ggml type {id} is not a block type Backpropagate reads"
            )),
        },
        _ => Err("its ggml type must be one U8 value".into()),
    }
}

/// The stored (rows, bytes per row) of a `ty` tensor of logical `shape` (last
/// dimension fastest), or why it cannot be held in blocks of that type.
pub fn stored_shape(ty: GgmlType, shape: &[usize]) -> Result<[usize; 2], String> {
    let cols = shape.last().copied().unwrap_or(1);
    let (n, _) = ty.block();
    if !cols.is_multiple_of(n) {
        return Err(format!(
            "rows of {cols} values do not split into {} blocks of {n}",
            ty.name()
        ));
    }
    let rows = shape[..shape.len().saturating_sub(1)].iter().product();
    Ok([rows, ty.bytes_for(cols)])
}

/// Checks that stored blocks (U8 of `stored`) hold a `ty` tensor of `shape`.
pub fn check(
    ty: GgmlType,
    dtype: safetensors::Dtype,
    stored: &[usize],
    shape: &[usize],
) -> Result<(), String> {
    let want = stored_shape(ty, shape)?;
    if dtype != safetensors::Dtype::U8 || stored != want {
        return Err(format!(
            "its {} blocks are {dtype:?} {stored:?}, but {shape:?} needs U8 {want:?}",
            ty.name()
        ));
    }
    Ok(())
}

/// The `elements` values of stored blocks.
pub fn decode(ty: GgmlType, bytes: &[u8], elements: usize) -> Result<Vec<f32>, String> {
    if !elements.is_multiple_of(ty.block().0) || bytes.len() != ty.bytes_for(elements) {
        return Err(format!(
            "{} bytes of {} blocks do not hold {elements} values",
            bytes.len(),
            ty.name()
        ));
    }
    let mut out = vec![0f32; elements];
    super::decode(bytes, ty, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_types_are_checked() {
        assert_eq!(stored_shape(GgmlType::Q4K, &[3, 512]), Ok([3, 288]));
        assert_eq!(stored_shape(GgmlType::Q8_0, &[64]), Ok([1, 68]));
        assert!(stored_shape(GgmlType::Q4K, &[3, 96]).is_err());
        let u8 = safetensors::Dtype::U8;
        assert_eq!(type_of(u8, &[12]), Ok(GgmlType::Q4K));
        assert!(type_of(u8, &[0]).is_err(), "f32 is not blocks");
        assert!(type_of(u8, &[99]).is_err());
        assert!(type_of(safetensors::Dtype::I32, &[12, 0, 0, 0]).is_err());
        assert!(check(GgmlType::Q8_0, u8, &[2, 34], &[2, 32]).is_ok());
        let err = check(GgmlType::Q8_0, u8, &[2, 33], &[2, 32]).unwrap_err();
        assert!(err.contains("needs U8 [2, 34]"), "{err}");
    }
}
