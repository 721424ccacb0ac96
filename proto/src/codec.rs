//! The one postcard framing of PON's serde messages (CU control frames,
//! local messages between proxy parts, steering, the CU's stored records):
//! a size limit checked on both sides, and no trailing bytes accepted, so a
//! truncated or concatenated message is an error rather than a silent
//! partial decode.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Appends `msg` to `out` (which may already hold a frame header) and fails
/// if the message itself takes more than `max` bytes.
pub fn encode_after<T: Serialize + ?Sized>(
    msg: &T,
    out: Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, CodecError> {
    let head = out.len();
    let v = postcard::to_extend(msg, out).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let len = v.len() - head;
    if len > max {
        return Err(CodecError::TooLong { len, max });
    }
    Ok(v)
}

/// `msg` alone, at most `max` bytes.
pub fn encode<T: Serialize + ?Sized>(msg: &T, max: usize) -> Result<Vec<u8>, CodecError> {
    encode_after(msg, Vec::new(), max)
}

/// Exactly one message filling `bytes`, which may hold at most `max` bytes
/// (checked before decoding, so an oversized input costs nothing).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], max: usize) -> Result<T, CodecError> {
    if bytes.len() > max {
        return Err(CodecError::TooLong {
            len: bytes.len(),
            max,
        });
    }
    let (m, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_trailing_bytes() {
        let v = encode(&(1u8, 2u32), 16).unwrap();
        assert_eq!(decode::<(u8, u32)>(&v, 16).unwrap(), (1, 2));
        assert_eq!(
            encode(&[0u8; 20][..], 8),
            Err(CodecError::TooLong { len: 21, max: 8 })
        );
        assert!(matches!(
            decode::<(u8, u32)>(&v, 1),
            Err(CodecError::TooLong { .. })
        ));
        let mut extra = v.clone();
        extra.push(0);
        assert!(matches!(
            decode::<(u8, u32)>(&extra, 16),
            Err(CodecError::Malformed(_))
        ));
        let framed = encode_after(&7u8, vec![0; 4], 1).unwrap();
        assert_eq!(framed, [0, 0, 0, 0, 7]);
    }
}
