//! The one place that knows how values are encoded on disk.
//!
//! Every stored value is `[format version byte] ‖ bincode 2 (serde, standard config)`. bincode is
//! pinned and marked unmaintained upstream; keeping it behind this module and the version byte means
//! a future format can be introduced (new version byte) while old values stay readable.

use std::borrow::Cow;
use std::cell::RefCell;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Format 1: bincode 2.0.1, `config::standard()` (varint integers, little endian).
pub const FORMAT_V1: u8 = 1;
/// Format 2: bincode 2.0.1 with fixed-width integers. For values that are mostly large integer
/// arrays (distinct-user sketches), where varint coding costs CPU and saves nothing.
pub const FORMAT_V2_FIXED: u8 = 2;
/// Format 3: format 1 compressed with LZ4 (uncompressed size first, u32 little endian). For log
/// entries, compressed by the sender, in parallel, rather than by the storage engine on the one
/// log writer thread (docs/decisions/0014).
pub const FORMAT_V3_LZ4: u8 = 3;
/// Format 4: format 2 compressed with LZ4 (uncompressed size first, u32 little endian). For
/// distinct-user sketches: a HyperLogLog of a few hundred users is 48 KiB of mostly zero
/// registers, which LZ4 shrinks more than tenfold (`sparse_sketches_compress` checks it;
/// docs/decisions/0016).
pub const FORMAT_V4_FIXED_LZ4: u8 = 4;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("cannot encode value: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot decode value: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("empty value")]
    Empty,
    #[error("unknown value format version {0}")]
    UnknownVersion(u8),
    #[error("value of {0} bytes is too large to compress")]
    TooLarge(usize),
    #[error("cannot compress value: {0}")]
    Compress(String),
    #[error("cannot decompress value: {0}")]
    Decompress(String),
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Encodes `value` with the current format version.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    out.push(FORMAT_V1);
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())?;
    Ok(out)
}

/// Encodes `value` with fixed-width integers (format 2).
pub fn encode_fixed<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(1024);
    out.push(FORMAT_V2_FIXED);
    let config = bincode::config::standard().with_fixed_int_encoding();
    bincode::serde::encode_into_std_write(value, &mut out, config)?;
    Ok(out)
}

/// Encodes `value` like [`encode`], then compresses it (format 3).
pub fn encode_compressed<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let config = bincode::config::standard();
    compressed(FORMAT_V3_LZ4, bincode_into(value, config), joined)
}

/// [`encode_compressed`], built in the storage engine's own buffer type: inserting it into a
/// keyspace takes it as it is, where a `Vec` would be copied into a new buffer, for a log entry
/// on the log writer thread (docs/decisions/0015).
pub fn encode_compressed_value<T: Serialize>(value: &T) -> Result<fjall::Slice, CodecError> {
    let config = bincode::config::standard();
    compressed(
        FORMAT_V3_LZ4,
        bincode_into(value, config),
        |header, body| {
            let len = header.len() + body.len();
            fjall::Slice::from_reader(&mut std::io::Read::chain(header, body), len)
                .map_err(|e| CodecError::Compress(e.to_string()))
        },
    )
}

/// Encodes `value` like [`encode_fixed`], then compresses it (format 4).
pub fn encode_fixed_compressed<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let config = bincode::config::standard().with_fixed_int_encoding();
    compressed(FORMAT_V4_FIXED_LZ4, bincode_into(value, config), joined)
}

/// Writes `value` into a buffer with bincode's `config`.
fn bincode_into<T: Serialize, C: bincode::config::Config + 'static>(
    value: &T,
    config: C,
) -> impl FnOnce(&mut Vec<u8>) -> Result<usize, bincode::error::EncodeError> + '_ {
    move |plain| bincode::serde::encode_into_std_write(value, plain, config)
}

/// A compressed value's header and block as one `Vec`.
fn joined(header: &[u8], body: &[u8]) -> Result<Vec<u8>, CodecError> {
    Ok([header, body].concat())
}

/// The buffers a thread encodes and compresses values in, kept between values: each log entry
/// (tens of KiB) would otherwise cost two fresh buffers, the copies of the first one's growth
/// and the zeroing of the second, and LZ4 a fresh zeroed hash table (docs/decisions/0015).
/// Buffers that grew past [`SCRATCH_KEEP`] for a large value are not kept.
#[derive(Default)]
struct Scratch {
    plain: Vec<u8>,
    packed: Vec<u8>,
    /// LZ4's hash table: cleared for each value instead of allocated zeroed.
    table: lz4_flex::block::CompressTable,
}

const SCRATCH_KEEP: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// `version ‖ uncompressed size (u32 LE) ‖ LZ4 block` of what `encode` writes, put together by
/// `build` from the first two (the header) and the block.
fn compressed<R>(
    version: u8,
    encode: impl FnOnce(&mut Vec<u8>) -> Result<usize, bincode::error::EncodeError>,
    build: impl FnOnce(&[u8], &[u8]) -> Result<R, CodecError>,
) -> Result<R, CodecError> {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let result = compress_with(&mut scratch, version, encode, build);
            // `packed` keeps its length: what it holds is initialized, so the next value's
            // compression writes over it without zeroing it first.
            let Scratch { plain, packed, .. } = &mut *scratch;
            for buffer in [plain, packed] {
                if buffer.capacity() > SCRATCH_KEEP {
                    *buffer = Vec::new();
                }
            }
            result
        }
        // Only if serializing a value compressed another one on this thread.
        Err(_) => compress_with(&mut Scratch::default(), version, encode, build),
    })
}

fn compress_with<R>(
    scratch: &mut Scratch,
    version: u8,
    encode: impl FnOnce(&mut Vec<u8>) -> Result<usize, bincode::error::EncodeError>,
    build: impl FnOnce(&[u8], &[u8]) -> Result<R, CodecError>,
) -> Result<R, CodecError> {
    let Scratch {
        plain,
        packed,
        table,
    } = scratch;
    plain.clear();
    encode(plain)?;
    let size = u32::try_from(plain.len()).map_err(|_| CodecError::TooLarge(plain.len()))?;
    let most = lz4_flex::block::get_maximum_output_size(plain.len());
    if packed.len() < most {
        packed.resize(most, 0);
    }
    let written = lz4_flex::block::compress_into_with_table(plain, packed, table)
        .map_err(|e| CodecError::Compress(e.to_string()))?;
    let mut header = [version, 0, 0, 0, 0];
    header[1..].copy_from_slice(&size.to_le_bytes());
    build(&header, &packed[..written])
}

/// Largest value decoding may claim. bincode checks every length prefix against it before
/// allocating, so a corrupt value fails to decode instead of asking for exabytes.
const DECODE_LIMIT: usize = 256 << 20;

/// Decodes a value written by any of the `encode` functions (any supported format version).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    plain(bytes)?.decode()
}

/// A stored value's bincode body, decompressed if it was stored compressed. Decoding from it
/// with [`Plain::decode`] can borrow text from it instead of allocating it.
pub struct Plain<'a> {
    body: Cow<'a, [u8]>,
    fixed_width: bool,
}

/// Reads a stored value's format version and decompresses its body if need be.
pub fn plain(bytes: &[u8]) -> Result<Plain<'_>, CodecError> {
    let (version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    let (body, fixed_width) = match *version {
        FORMAT_V1 => (Cow::Borrowed(body), false),
        FORMAT_V2_FIXED => (Cow::Borrowed(body), true),
        FORMAT_V3_LZ4 => (Cow::Owned(decompress(body)?), false),
        FORMAT_V4_FIXED_LZ4 => (Cow::Owned(decompress(body)?), true),
        other => return Err(CodecError::UnknownVersion(other)),
    };
    Ok(Plain { body, fixed_width })
}

impl Plain<'_> {
    /// Decodes the value; `T` may borrow from `self` (`&str` fields, say).
    pub fn decode<'b, T: Deserialize<'b>>(&'b self) -> Result<T, CodecError> {
        Ok(self.decode_at(0)?.0)
    }

    /// Decodes a value followed by an optional trailer `U`, added to the layout after values
    /// without it were stored: those decode with `U::default()`.
    pub fn decode_with_trailer<'b, T: Deserialize<'b>, U: Deserialize<'b> + Default>(
        &'b self,
    ) -> Result<(T, U), CodecError> {
        let (value, read) = self.decode_at::<T>(0)?;
        if read >= self.body.len() {
            return Ok((value, U::default()));
        }
        Ok((value, self.decode_at::<U>(read)?.0))
    }

    /// Decodes a value followed by two optional trailers, each added to the layout after values
    /// without it were stored: a missing trailer decodes as its `Default`.
    pub fn decode_with_trailers<
        'b,
        T: Deserialize<'b>,
        U: Deserialize<'b> + Default,
        V: Deserialize<'b> + Default,
    >(
        &'b self,
    ) -> Result<(T, U, V), CodecError> {
        let (value, read) = self.decode_at::<T>(0)?;
        if read >= self.body.len() {
            return Ok((value, U::default(), V::default()));
        }
        let (first, read) = self.decode_at::<U>(read)?;
        if read >= self.body.len() {
            return Ok((value, first, V::default()));
        }
        Ok((value, first, self.decode_at::<V>(read)?.0))
    }

    /// [`Plain::decode_with_trailers`] with a third optional trailer.
    pub fn decode_with_three_trailers<
        'b,
        T: Deserialize<'b>,
        U: Deserialize<'b> + Default,
        V: Deserialize<'b> + Default,
        W: Deserialize<'b> + Default,
    >(
        &'b self,
    ) -> Result<(T, U, V, W), CodecError> {
        let (value, read) = self.decode_at::<T>(0)?;
        let mut trailers = (U::default(), V::default(), W::default());
        if read >= self.body.len() {
            return Ok((value, trailers.0, trailers.1, trailers.2));
        }
        let read = {
            let (first, read) = self.decode_at::<U>(read)?;
            trailers.0 = first;
            read
        };
        if read >= self.body.len() {
            return Ok((value, trailers.0, trailers.1, trailers.2));
        }
        let (second, read) = self.decode_at::<V>(read)?;
        trailers.1 = second;
        if read < self.body.len() {
            trailers.2 = self.decode_at::<W>(read)?.0;
        }
        Ok((value, trailers.0, trailers.1, trailers.2))
    }

    fn decode_at<'b, T: Deserialize<'b>>(&'b self, from: usize) -> Result<(T, usize), CodecError> {
        let body = self.body.get(from..).ok_or(CodecError::Empty)?;
        let standard = bincode::config::standard().with_limit::<DECODE_LIMIT>();
        let (value, read) = if self.fixed_width {
            let config = standard.with_fixed_int_encoding();
            bincode::serde::borrow_decode_from_slice(body, config)?
        } else {
            bincode::serde::borrow_decode_from_slice(body, standard)?
        };
        Ok((value, from + read))
    }
}

/// Decompresses the body of format 3 or 4, checking the size prefix before allocating it.
fn decompress(body: &[u8]) -> Result<Vec<u8>, CodecError> {
    let claimed = body
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or(CodecError::Empty)?;
    // LZ4 expands at most ~255 times: a larger claim is corrupt.
    if claimed as usize > DECODE_LIMIT.min(body.len().saturating_mul(255)) {
        return Err(CodecError::Decompress(format!(
            "claims {claimed} bytes, more than the {DECODE_LIMIT}-byte limit"
        )));
    }
    lz4_flex::decompress_size_prepended(body).map_err(|e| CodecError::Decompress(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::event::{BatchSource, EventKind, LogBatch, StoredEvent};
    use proptest::prelude::*;

    fn arb_kind() -> impl Strategy<Value = EventKind> {
        prop_oneof![
            Just(EventKind::Track),
            Just(EventKind::Identify),
            Just(EventKind::Page),
            Just(EventKind::Screen),
            Just(EventKind::Group),
            Just(EventKind::Alias),
        ]
    }

    prop_compose! {
        fn arb_event()(
            kind in arb_kind(),
            message_id in ".{0,40}",
            name in proptest::option::of(".{0,30}"),
            user_id in proptest::option::of(".{0,30}"),
            anonymous_id in proptest::option::of("[a-z0-9-]{0,36}"),
            timestamp in any::<i64>(),
            original_timestamp in proptest::option::of(any::<i64>()),
            received_at in any::<i64>(),
            user_hash in any::<u64>(),
            flags in any::<u8>(),
            properties in proptest::option::of("\\{\"[a-z]{1,8}\":[0-9]{1,6}\\}"),
            extra in proptest::collection::vec(("[a-z]{1,8}", "[0-9]{1,4}"), 0..3),
        ) -> StoredEvent {
            StoredEvent {
                kind, message_id, name, user_id, anonymous_id,
                group_id: None, previous_id: None,
                timestamp, original_timestamp, sent_at: None, received_at, user_hash,
                library_name: Some("analytics-node".into()), library_version: None,
                flags, properties, traits: None, context: None, integrations: None, extra,
            }
        }
    }

    proptest! {
        #[test]
        fn log_batches_round_trip(events in proptest::collection::vec(arb_event(), 0..20),
                                  batch_id in any::<u128>(), received_at in any::<i64>()) {
            let batch = LogBatch {
                batch_id,
                received_at,
                source: BatchSource { endpoint: "/v1/batch".into(), client_ip: Some("10.0.0.0".into()) },
                events,
                shared: Default::default(),
                extras: Vec::new(),
            };
            let bytes = encode(&batch).unwrap();
            prop_assert_eq!(bytes[0], FORMAT_V1);
            let back: LogBatch = decode(&bytes).unwrap();
            prop_assert_eq!(&back, &batch);
            let bytes = encode_compressed(&batch).unwrap();
            prop_assert_eq!(bytes[0], FORMAT_V3_LZ4);
            let back: LogBatch = decode(&bytes).unwrap();
            prop_assert_eq!(&back, &batch);
            let plain = plain(&bytes).unwrap();
            let view: crate::event::LogBatchView = plain.decode().unwrap();
            let events: Vec<StoredEvent> = view.events.iter().map(owned).collect();
            prop_assert_eq!(events, batch.events);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<LogBatch>(&bytes);
            let _ = decode::<crate::rollup::Sketch>(&bytes);
        }
    }

    /// The view's fields, back into an owned event (a struct literal: no field can be skipped).
    fn owned(view: &crate::event::StoredEventView<'_>) -> StoredEvent {
        let text = |t: Option<&str>| t.map(str::to_string);
        StoredEvent {
            kind: view.kind,
            message_id: view.message_id.to_string(),
            name: text(view.name),
            user_id: text(view.user_id),
            anonymous_id: text(view.anonymous_id),
            group_id: text(view.group_id),
            previous_id: text(view.previous_id),
            timestamp: view.timestamp,
            original_timestamp: view.original_timestamp,
            sent_at: view.sent_at,
            received_at: view.received_at,
            user_hash: view.user_hash,
            library_name: text(view.library_name),
            library_version: text(view.library_version),
            flags: view.flags,
            properties: text(view.properties),
            traits: text(view.traits),
            context: text(view.context),
            integrations: text(view.integrations),
            extra: view
                .extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn views_decode_what_was_stored() {
        let every_field = StoredEvent {
            kind: EventKind::Group,
            message_id: "m".into(),
            name: Some("n".into()),
            user_id: Some("u".into()),
            anonymous_id: Some("a".into()),
            group_id: Some("g".into()),
            previous_id: Some("p".into()),
            timestamp: 1,
            original_timestamp: Some(2),
            sent_at: Some(3),
            received_at: 4,
            user_hash: 5,
            library_name: Some("ln".into()),
            library_version: Some("lv".into()),
            flags: 6,
            properties: Some("{\"pr\":1}".into()),
            traits: Some("{\"tr\":2}".into()),
            context: Some("{\"co\":3}".into()),
            integrations: Some("{\"in\":4}".into()),
            extra: vec![("x".into(), "7".into()), ("y".into(), "8".into())],
        };
        let mut few_fields = every_field.clone();
        few_fields.name = None;
        few_fields.traits = None;
        few_fields.extra.clear();
        let batch = LogBatch {
            batch_id: 9,
            received_at: 10,
            source: BatchSource {
                endpoint: "/v1/group".into(),
                client_ip: Some("10.0.0.0".into()),
            },
            events: vec![every_field, few_fields],
            shared: Default::default(),
            extras: Vec::new(),
        };
        for bytes in [encode(&batch).unwrap(), encode_compressed(&batch).unwrap()] {
            let plain = plain(&bytes).unwrap();
            let view: crate::event::LogBatchView = plain.decode().unwrap();
            assert_eq!((view.batch_id, view.received_at), (9, 10));
            assert_eq!(view.source.endpoint, "/v1/group");
            assert_eq!(view.source.client_ip, Some("10.0.0.0"));
            let events: Vec<StoredEvent> = view.events.iter().map(owned).collect();
            assert_eq!(events, batch.events);
        }
    }

    #[test]
    fn fixed_width_values_round_trip() {
        let mut sketch = crate::rollup::Sketch::new();
        for user in 0..10_000u64 {
            sketch.insert_hash(user.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let bytes = encode_fixed(&sketch).unwrap();
        assert_eq!(bytes[0], FORMAT_V2_FIXED);
        let back: crate::rollup::Sketch = decode(&bytes).unwrap();
        assert_eq!(back.estimate(), sketch.estimate());
        let compressed = encode_fixed_compressed(&sketch).unwrap();
        assert_eq!(compressed[0], FORMAT_V4_FIXED_LZ4);
        let back: crate::rollup::Sketch = decode(&compressed).unwrap();
        assert_eq!(back, sketch);
    }

    #[test]
    fn compressed_values_keep_the_lz4_size_prepended_layout_whatever_came_before() {
        // Sizes around the kept buffers' limit, large then small, so each value is compressed
        // over what a larger one left in the thread's buffers.
        for len in [3 * SCRATCH_KEEP, 50_000, 10, 0, SCRATCH_KEEP, 700] {
            let text: String = (0..len).map(|i| char::from(b'a' + (i % 7) as u8)).collect();
            let bytes = encode_compressed(&text).unwrap();
            let mut plain = Vec::new();
            bincode::serde::encode_into_std_write(&text, &mut plain, bincode::config::standard())
                .unwrap();
            // The layout every stored format 3 value has, whatever buffers encoded it.
            let mut expected = vec![FORMAT_V3_LZ4];
            expected.extend_from_slice(&lz4_flex::compress_prepend_size(&plain));
            assert_eq!(bytes, expected, "{len} bytes");
            let value = encode_compressed_value(&text).unwrap();
            assert_eq!(&*value, &expected[..], "{len} bytes, as an engine value");
            assert_eq!(decode::<String>(&bytes).unwrap(), text);
        }
    }

    #[test]
    fn sparse_sketches_compress() {
        // 300 users: a dense HyperLogLog (48 KiB of registers), nearly all of them zero.
        let mut sketch = crate::rollup::Sketch::new();
        for user in 0..300u64 {
            sketch.insert_hash(user.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let plain = encode_fixed(&sketch).unwrap().len();
        let compressed = encode_fixed_compressed(&sketch).unwrap().len();
        assert!(plain > 40_000, "{plain}");
        assert!(compressed * 10 < plain, "{compressed} of {plain}");
    }

    #[test]
    fn huge_length_prefixes_fail_without_allocating() {
        // Format 2, then a string length of about 8.7e18 bytes.
        let mut bytes = vec![FORMAT_V2_FIXED];
        bytes.extend_from_slice(&0x7999_9999_9999_9999u64.to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
        let mut bytes = vec![FORMAT_V1, 253];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Vec<u8>>(&bytes).is_err());
        // Format 3 claiming 4 GiB of decompressed data.
        let mut bytes = vec![FORMAT_V3_LZ4];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0x1f, 0, 0]);
        assert!(matches!(
            decode::<Vec<u8>>(&bytes),
            Err(CodecError::Decompress(_))
        ));
    }

    #[test]
    fn unknown_version_is_an_error() {
        assert!(matches!(
            decode::<u8>(&[9, 1]),
            Err(CodecError::UnknownVersion(9))
        ));
        assert!(matches!(decode::<u8>(&[]), Err(CodecError::Empty)));
    }
}
