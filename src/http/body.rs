//! Reading request bodies: size limits, `Content-Encoding`, decompression-bomb protection.
//!
//! The compressed body may not exceed `max_body_bytes`, and decompression stops one byte past
//! `max_body_bytes` of output, so a small bomb cannot expand into memory. Supported encodings:
//! `gzip` (and `x-gzip`), `deflate` (zlib, or raw deflate as some clients send), `zstd`, `br`.

use std::io::Read;

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::http::errors::ApiError;

/// Reads and decodes the body, enforcing `max_bytes` before and after decompression.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "request body is larger than the limit of {max_bytes} bytes"
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max_bytes) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(max_bytes));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        if body.len() + chunk.len() > max_bytes {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    let encoding = req.headers().get(header::CONTENT_ENCODING).map(|v| {
        v.to_str()
            .unwrap_or("(not text)")
            .trim()
            .to_ascii_lowercase()
    });
    match encoding.as_deref() {
        None | Some("" | "identity") => Ok(body),
        Some(name) => decode(name, &body, max_bytes),
    }
}

/// Decompresses `body` encoded as `encoding`, producing at most `max_bytes`.
pub fn decode(encoding: &str, body: &[u8], max_bytes: usize) -> Result<Bytes, ApiError> {
    let result = match encoding {
        "gzip" | "x-gzip" => read_limited(flate2::read::MultiGzDecoder::new(body), max_bytes),
        "deflate" => {
            // HTTP says zlib-wrapped; some clients send raw deflate. A zlib stream starts with a
            // header whose first two bytes, read big-endian, are a multiple of 31.
            let zlib = body.len() >= 2 && (u16::from(body[0]) << 8 | u16::from(body[1])) % 31 == 0;
            if zlib {
                read_limited(flate2::read::ZlibDecoder::new(body), max_bytes)
            } else {
                read_limited(flate2::read::DeflateDecoder::new(body), max_bytes)
            }
        }
        "zstd" => match zstd::stream::read::Decoder::new(body) {
            Ok(decoder) => read_limited(decoder, max_bytes),
            Err(e) => Err(Decode::Corrupt(e)),
        },
        "br" => read_limited(brotli::Decompressor::new(body, 4096), max_bytes),
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "unsupported Content-Encoding {other:?}; use gzip, deflate, zstd or br"
            )))
        }
    };
    match result {
        Ok(bytes) => Ok(Bytes::from(bytes)),
        Err(Decode::TooLarge) => Err(ApiError::PayloadTooLarge(format!(
            "decompressed request body is larger than the limit of {max_bytes} bytes"
        ))),
        Err(Decode::Corrupt(e)) => Err(ApiError::bad_request(format!(
            "request body is not valid {encoding} data: {e}"
        ))),
    }
}

enum Decode {
    TooLarge,
    Corrupt(std::io::Error),
}

fn read_limited(reader: impl Read, max_bytes: usize) -> Result<Vec<u8>, Decode> {
    let mut out = Vec::with_capacity(64 * 1024);
    let limit = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut out)
        .map_err(Decode::Corrupt)?;
    if out.len() > max_bytes {
        return Err(Decode::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn every_encoding_round_trips() {
        let data = b"{\"batch\":[]}".repeat(100);
        assert_eq!(decode("gzip", &gzip(&data), 10_000).unwrap(), data);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(&data).unwrap();
        assert_eq!(
            decode("deflate", &zlib.finish().unwrap(), 10_000).unwrap(),
            data
        );
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(&data).unwrap();
        assert_eq!(
            decode("deflate", &raw.finish().unwrap(), 10_000).unwrap(),
            data
        );
        let zstd = zstd::stream::encode_all(&data[..], 1).unwrap();
        assert_eq!(decode("zstd", &zstd, 10_000).unwrap(), data);
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &data[..], &mut br, &Default::default()).unwrap();
        assert_eq!(decode("br", &br, 10_000).unwrap(), data);
    }

    #[test]
    fn bombs_stop_at_the_limit() {
        let bomb = gzip(&vec![b'a'; 50_000_000]);
        assert!(bomb.len() < 100_000);
        assert!(matches!(
            decode("gzip", &bomb, 1_000_000),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_any_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            for encoding in ["gzip", "x-gzip", "deflate", "zstd", "br", "compress"] {
                let _ = decode(encoding, &bytes, 64 * 1024);
            }
        }
    }

    #[test]
    fn corrupt_and_unknown_encodings_are_errors() {
        assert!(matches!(
            decode("gzip", b"not gzip", 1000),
            Err(ApiError::BadRequest { .. })
        ));
        assert!(matches!(
            decode("zstd", b"not zstd", 1000),
            Err(ApiError::BadRequest { .. })
        ));
        assert!(matches!(
            decode("lz4", b"x", 1000),
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }
}
