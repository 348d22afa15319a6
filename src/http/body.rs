//! Reading request bodies: size limits, time limits, `Content-Encoding`, decompression-bomb
//! protection.
//!
//! [`receive`] reads the body as sent: at most `max_body_bytes`, within the body deadline, into
//! a buffer that grows with the bytes that actually arrive (a declared `Content-Length` sizes it
//! only up to [`INITIAL_CAPACITY_CAP`], so a client that declares 4 MB and sends nothing holds
//! almost nothing). [`decode`] then decompresses it, stopping one byte past `max_body_bytes` of
//! output, so a small bomb cannot expand into memory. Supported encodings: `gzip` (and
//! `x-gzip`), `deflate` (zlib, or raw deflate as some clients send), `zstd` (window at most
//! [`ZSTD_WINDOW_LOG_MAX`]), `br`.

use std::io::Read;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::http::deadline;
use crate::http::errors::ApiError;

/// Most bytes reserved ahead of their arrival for a body with a `Content-Length`.
pub const INITIAL_CAPACITY_CAP: usize = 16 * 1024;

/// Largest zstd window a body may use (8 MiB): no body is larger than its limit (4 MiB by
/// default), and a frame asking for zstd's usual maximum (128 MiB and more) would make the
/// decoder reserve that much.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// The bound on large bodies decompressed and parsed at once (`server.max_concurrent_large_bodies`):
/// a client sending many large or compressed bodies, with a key or without, holds at most
/// these places, whatever its number of connections.
pub struct LargeBodies {
    permits: tokio::sync::Semaphore,
}

impl LargeBodies {
    pub fn new(permits: usize) -> LargeBodies {
        LargeBodies {
            permits: tokio::sync::Semaphore::new(permits.max(1)),
        }
    }

    /// A place, waiting at most `wait` for one (else 503).
    pub async fn acquire(
        &self,
        wait: Duration,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        match tokio::time::timeout(wait, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::unavailable(
                "too many large request bodies are being processed; retry shortly",
            )),
        }
    }
}

/// A body as received, before decompression.
pub struct Received {
    pub bytes: Bytes,
    /// The `Content-Encoding`, lower-cased; `None` for an identity body.
    pub encoding: Option<String>,
}

/// Reads the body as sent: at most `max_bytes`, all of it within `timeout`, the body deadline
/// that [`deadline`] puts on every request (else 408).
pub async fn receive(
    req: &HttpRequest,
    payload: web::Payload,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Received, ApiError> {
    // The body deadline itself is `deadline`'s, on every route: it ends the body stream with a
    // timeout error, answered here with 408.
    let bytes = match read_limited_stream(req, payload, max_bytes).await {
        Ok(bytes) => bytes,
        Err(BodyError::TimedOut) => {
            return Err(ApiError::RequestTimeout(format!(
                "the request body did not arrive within {} (server.body_timeout)",
                humantime::format_duration(timeout)
            )))
        }
        Err(BodyError::Api(error)) => return Err(error),
    };
    let encoding = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| {
            v.to_str()
                .unwrap_or("(not text)")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|name| !name.is_empty() && name != "identity");
    Ok(Received { bytes, encoding })
}

enum BodyError {
    TimedOut,
    Api(ApiError),
}

impl From<ApiError> for BodyError {
    fn from(error: ApiError) -> BodyError {
        BodyError::Api(error)
    }
}

async fn read_limited_stream(
    req: &HttpRequest,
    mut payload: web::Payload,
    max_bytes: usize,
) -> Result<Bytes, BodyError> {
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
        return Err(too_large().into());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0).min(INITIAL_CAPACITY_CAP));
    while let Some(chunk) = payload.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) if deadline::is_timeout(&error) => return Err(BodyError::TimedOut),
            Err(error) => {
                return Err(
                    ApiError::bad_request(format!("cannot read request body: {error}")).into(),
                )
            }
        };
        if body.len() + chunk.len() > max_bytes {
            return Err(too_large().into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

impl Received {
    /// The body decompressed (at most `max_bytes`).
    pub fn decoded(self, max_bytes: usize) -> Result<Bytes, ApiError> {
        match self.encoding.as_deref() {
            None => Ok(self.bytes),
            Some(name) => decode(name, &self.bytes, max_bytes),
        }
    }

    /// The body decompressed if it is smaller than `small_bytes` (else `None`), having spent at
    /// most that much decompression on it: what an HTTP worker may do itself.
    pub fn decoded_if_small(&self, small_bytes: usize) -> Result<Option<Bytes>, ApiError> {
        match self.encoding.as_deref() {
            None => Ok((self.bytes.len() < small_bytes).then(|| self.bytes.clone())),
            Some(name) => decode_within(name, &self.bytes, small_bytes.saturating_sub(1)),
        }
    }
}

/// Decompresses `body` encoded as `encoding`, producing at most `max_bytes`.
pub fn decode(encoding: &str, body: &[u8], max_bytes: usize) -> Result<Bytes, ApiError> {
    decode_within(encoding, body, max_bytes)?.ok_or_else(|| {
        ApiError::PayloadTooLarge(format!(
            "decompressed request body is larger than the limit of {max_bytes} bytes"
        ))
    })
}

/// Like [`decode`], with `None` for a body that decompresses to more than `max_bytes` (having
/// spent at most that much work on it).
pub fn decode_within(
    encoding: &str,
    body: &[u8],
    max_bytes: usize,
) -> Result<Option<Bytes>, ApiError> {
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
        "zstd" => match zstd::stream::read::Decoder::new(body).and_then(|mut decoder| {
            decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Ok(decoder)
        }) {
            Ok(decoder) => read_limited(decoder, max_bytes),
            Err(e) => Err(Decode::Corrupt(e)),
        },
        "br" if is_large_window_brotli(body) => {
            return Err(ApiError::bad_request(
                "request body is large-window brotli, which is not accepted (use standard br)",
            ))
        }
        "br" => read_limited(brotli::Decompressor::new(body, 4096), max_bytes),
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "unsupported Content-Encoding {other:?}; use gzip, deflate, zstd or br"
            )))
        }
    };
    match result {
        Ok(bytes) => Ok(Some(Bytes::from(bytes))),
        Err(Decode::TooLarge) => Ok(None),
        Err(Decode::Corrupt(e)) => Err(ApiError::bad_request(format!(
            "request body is not valid {encoding} data: {e}"
        ))),
    }
}

/// Whether a brotli stream uses the large-window extension (windows up to 1 GiB, which the
/// decoder would reserve for a body of a few bytes). Its first 7 bits are `0010001` (read
/// least significant first: WBITS escape, then the large-window marker); standard brotli,
/// what HTTP's `br` means, has windows of at most 16 MiB.
fn is_large_window_brotli(body: &[u8]) -> bool {
    body.first().is_some_and(|first| first & 0x7f == 0x11)
}

enum Decode {
    TooLarge,
    Corrupt(std::io::Error),
}

fn read_limited(reader: impl Read, max_bytes: usize) -> Result<Vec<u8>, Decode> {
    let mut out = Vec::with_capacity((64 * 1024).min(max_bytes + 1));
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
    fn zstd_frames_with_a_huge_window_are_refused() {
        // A frame that declares a 1 GiB window (long-distance mode) decodes nothing here.
        let data = vec![7u8; 1000];
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        encoder.long_distance_matching(true).unwrap();
        encoder.window_log(30).unwrap();
        encoder.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut encoder, &data).unwrap();
        let frame = encoder.finish().unwrap();
        assert!(matches!(
            decode("zstd", &frame, 10_000),
            Err(ApiError::BadRequest { .. })
        ));
        // An ordinary frame still decodes.
        let ordinary = zstd::stream::encode_all(&data[..], 3).unwrap();
        assert_eq!(decode("zstd", &ordinary, 10_000).unwrap(), data);
    }

    #[test]
    fn large_window_brotli_is_refused_before_decoding() {
        // Found by fuzzing: seven bytes that asked the decoder for more than 1 GiB.
        let found = [17u8, 158, 4, 65, 4, 86, 240];
        let err = decode("br", &found, 10_000).unwrap_err();
        assert!(err.to_string().contains("large-window"), "{err}");
        // Standard brotli with the largest standard window still decodes.
        let data = b"standard".repeat(100);
        let mut br = Vec::new();
        let params = brotli::enc::BrotliEncoderParams {
            lgwin: 24,
            ..Default::default()
        };
        brotli::BrotliCompress(&mut &data[..], &mut br, &params).unwrap();
        assert!(!is_large_window_brotli(&br));
        assert_eq!(decode("br", &br, 10_000).unwrap(), data);
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
