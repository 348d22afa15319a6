//! A cold segment: one Parquet object of a tenant's events of one hour (by corrected event
//! time), from one flush, in sequence order.
//!
//! Typed columns for what warehouses filter and group on, the JSON objects as text, zstd, row
//! groups of at most [`ROW_GROUP_ROWS`] rows, column statistics, and bloom filters on the user
//! columns (per-user erasure finds the segments holding a user through them). A row holds
//! everything the hot log keeps of an event, with the batch-level context and integrations
//! merged in, so a segment reads back into the same events.

use std::sync::Arc;

use arrow_array::builder::{
    StringBuilder, TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder, UInt8Builder,
};
use arrow_array::{
    Array, ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt32Array, UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow_select::filter::filter_record_batch;
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{ReaderProperties, WriterProperties};
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::{ReadOptionsBuilder, SerializedFileReader};
use parquet::schema::types::ColumnPath;

use super::ColdError;
use crate::event::{EventExtras, EventKind, Micros, StoredEvent};

/// Most rows of one row group.
pub const ROW_GROUP_ROWS: usize = 100_000;

/// One event as a segment holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdRow {
    pub seq: u64,
    pub batch_id: u128,
    pub endpoint: String,
    pub client_ip: Option<String>,
    /// The event, its `context` and `integrations` merged with its batch's.
    pub event: StoredEvent,
    /// Its weight and derived fields, when it has any.
    pub extras: Option<EventExtras>,
}

/// The columns of the derived fields (`EventExtras::derived`), and their names there. Segments
/// written before a column existed read as null in it.
const DERIVED_COLUMNS: [(&str, &str); 14] = [
    ("browser", "browser"),
    ("browser_version", "browserVersion"),
    ("os", "os"),
    ("os_version", "osVersion"),
    ("device_type", "deviceType"),
    ("country", "country"),
    ("region", "region"),
    ("city", "city"),
    ("referrer_host", "referrerHost"),
    ("utm_source", "utmSource"),
    ("utm_medium", "utmMedium"),
    ("utm_campaign", "utmCampaign"),
    ("utm_term", "utmTerm"),
    ("utm_content", "utmContent"),
];

const UTC: &str = "UTC";

fn schema() -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let time = |name: &str, nullable: bool| {
        Field::new(
            name,
            DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
            nullable,
        )
    };
    let mut fields = vec![
        Field::new("seq", DataType::UInt64, false),
        text("message_id", false),
        text("type", false),
        text("event", true),
        text("user_id", true),
        text("anonymous_id", true),
        text("group_id", true),
        text("previous_id", true),
        Field::new("user_hash", DataType::UInt64, false),
        time("timestamp", false),
        time("original_timestamp", true),
        time("sent_at", true),
        time("received_at", false),
        text("endpoint", false),
        text("library_name", true),
        text("library_version", true),
        text("client_ip", true),
        text("batch_id", false),
        Field::new("flags", DataType::UInt8, false),
        text("properties", true),
        text("traits", true),
        text("context", true),
        text("integrations", true),
        text("extra", true),
    ];
    fields.push(Field::new("weight", DataType::UInt32, false));
    fields.extend(DERIVED_COLUMNS.iter().map(|(name, _)| text(name, true)));
    Arc::new(Schema::new(fields))
}

/// Rows per record batch when a segment is read: a reader holds one decoded batch per open
/// segment, whatever the segment's size.
const READ_BATCH_ROWS: usize = 4096;

/// Writes one segment, a record batch at a time: row groups are encoded and compressed as they
/// fill, so what the writer holds is the compressed object plus one row group's columns.
pub struct SegmentWriter {
    writer: ArrowWriter<Vec<u8>>,
    schema: SchemaRef,
    rows: u64,
}

impl SegmentWriter {
    pub fn new() -> Result<SegmentWriter, ColdError> {
        let schema = schema();
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_column_bloom_filter_enabled(ColumnPath::from("user_id"), true)
            .set_column_bloom_filter_enabled(ColumnPath::from("anonymous_id"), true)
            .build();
        let writer = ArrowWriter::try_new(Vec::new(), Arc::clone(&schema), Some(properties))?;
        Ok(SegmentWriter {
            writer,
            schema,
            rows: 0,
        })
    }

    /// Appends rows (in sequence order, after those written before).
    pub fn write_rows(&mut self, rows: &[ColdRow]) -> Result<(), ColdError> {
        for chunk in rows.chunks(READ_BATCH_ROWS) {
            let batch = record_batch(&self.schema, chunk)?;
            self.write_batch(&batch)?;
        }
        Ok(())
    }

    /// Appends a record batch read from another segment (one written with fewer columns is
    /// rewritten with today's).
    pub fn write_batch(&mut self, batch: &RecordBatch) -> Result<(), ColdError> {
        if batch.schema().fields() != self.schema.fields() {
            return self.write_rows(&rows_of(batch)?);
        }
        self.writer.write(batch)?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The finished object.
    pub fn finish(self) -> Result<Bytes, ColdError> {
        Ok(Bytes::from(self.writer.into_inner()?))
    }
}

/// Encodes rows (in sequence order) as one Parquet object. Blocking (CPU).
pub fn encode(rows: &[ColdRow]) -> Result<Bytes, ColdError> {
    let mut writer = SegmentWriter::new()?;
    writer.write_rows(rows)?;
    writer.finish()
}

/// The record batches of a segment, in order, decoded one at a time. Blocking (CPU).
pub fn batches(
    bytes: Bytes,
) -> Result<impl Iterator<Item = Result<RecordBatch, ColdError>>, ColdError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?
        .with_batch_size(READ_BATCH_ROWS)
        .build()?;
    Ok(reader.map(|batch| batch.map_err(ColdError::from)))
}

/// Whether a segment may hold events whose `userId` or `anonymousId` is `user`, by its bloom
/// filters (false: certainly not; a row group without a filter may). Blocking.
pub fn may_hold_user(bytes: Bytes, user: &str) -> Result<bool, ColdError> {
    let options = ReadOptionsBuilder::new()
        .with_reader_properties(
            ReaderProperties::builder()
                .set_read_bloom_filter(true)
                .build(),
        )
        .build();
    let reader = SerializedFileReader::new_with_options(bytes, options)?;
    let columns = reader.metadata().file_metadata().schema_descr();
    let wanted: Vec<usize> = (0..columns.num_columns())
        .filter(|&i| matches!(columns.column(i).name(), "user_id" | "anonymous_id"))
        .collect();
    for group in 0..reader.num_row_groups() {
        let row_group = reader.get_row_group(group)?;
        for &column in &wanted {
            match row_group.get_column_bloom_filter(column) {
                Some(filter) if !filter.check(user) => {}
                _ => return Ok(true),
            }
        }
    }
    Ok(false)
}

/// The rows of `batch` whose `user_id` and `anonymous_id` are not `user`, and how many were
/// left out.
pub fn without_user(batch: &RecordBatch, user: &str) -> Result<(RecordBatch, usize), ColdError> {
    let column = |name: &str| -> Result<StringArray, ColdError> {
        batch
            .column_by_name(name)
            .and_then(|array| array.as_any().downcast_ref::<StringArray>().cloned())
            .ok_or_else(|| ColdError::Corrupt(format!("segment has no text column `{name}`")))
    };
    let (user_id, anonymous_id) = (column("user_id")?, column("anonymous_id")?);
    let is_user = |array: &StringArray, i: usize| array.is_valid(i) && array.value(i) == user;
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|i| Some(!is_user(&user_id, i) && !is_user(&anonymous_id, i)))
        .collect();
    let removed = batch.num_rows() - keep.true_count();
    Ok((filter_record_batch(batch, &keep)?, removed))
}

fn record_batch(schema: &SchemaRef, rows: &[ColdRow]) -> Result<RecordBatch, ColdError> {
    let texts = |get: &dyn Fn(&ColdRow) -> Option<&str>| -> ArrayRef {
        let mut builder = StringBuilder::new();
        for row in rows {
            builder.append_option(get(row));
        }
        Arc::new(builder.finish())
    };
    let times = |get: &dyn Fn(&ColdRow) -> Option<Micros>| -> ArrayRef {
        let mut builder = TimestampMicrosecondBuilder::new().with_timezone(UTC);
        for row in rows {
            builder.append_option(get(row));
        }
        Arc::new(builder.finish())
    };
    let numbers = |get: &dyn Fn(&ColdRow) -> u64| -> ArrayRef {
        let mut builder = UInt64Builder::new();
        for row in rows {
            builder.append_value(get(row));
        }
        Arc::new(builder.finish())
    };
    let mut flags = UInt8Builder::new();
    for row in rows {
        flags.append_value(row.event.flags);
    }
    let batch_ids: Vec<String> = rows
        .iter()
        .map(|row| uuid::Uuid::from_u128(row.batch_id).to_string())
        .collect();
    let extras: Vec<Option<String>> = rows
        .iter()
        .map(|row| {
            (!row.event.extra.is_empty())
                .then(|| serde_json::to_string(&row.event.extra).unwrap_or_default())
        })
        .collect();
    let mut columns: Vec<ArrayRef> = vec![
        numbers(&|row| row.seq),
        texts(&|row| Some(&row.event.message_id)),
        texts(&|row| Some(row.event.kind.as_str())),
        texts(&|row| row.event.name.as_deref()),
        texts(&|row| row.event.user_id.as_deref()),
        texts(&|row| row.event.anonymous_id.as_deref()),
        texts(&|row| row.event.group_id.as_deref()),
        texts(&|row| row.event.previous_id.as_deref()),
        numbers(&|row| row.event.user_hash),
        times(&|row| Some(row.event.timestamp)),
        times(&|row| row.event.original_timestamp),
        times(&|row| row.event.sent_at),
        times(&|row| Some(row.event.received_at)),
        texts(&|row| Some(&row.endpoint)),
        texts(&|row| row.event.library_name.as_deref()),
        texts(&|row| row.event.library_version.as_deref()),
        texts(&|row| row.client_ip.as_deref()),
        Arc::new(StringArray::from_iter_values(&batch_ids)),
        Arc::new(flags.finish()),
        texts(&|row| row.event.properties.as_deref()),
        texts(&|row| row.event.traits.as_deref()),
        texts(&|row| row.event.context.as_deref()),
        texts(&|row| row.event.integrations.as_deref()),
        Arc::new(StringArray::from(extras)),
    ];
    let mut weights = UInt32Builder::new();
    for row in rows {
        weights.append_value(row.extras.as_ref().map_or(1, |e| e.weight));
    }
    columns.push(Arc::new(weights.finish()));
    let derived: Vec<std::collections::BTreeMap<String, String>> = rows
        .iter()
        .map(|row| {
            (row.extras.as_ref())
                .and_then(|e| e.derived.as_deref())
                .and_then(|text| serde_json::from_str(text).ok())
                .unwrap_or_default()
        })
        .collect();
    for (_, key) in DERIVED_COLUMNS {
        let mut builder = StringBuilder::new();
        for fields in &derived {
            builder.append_option(fields.get(key));
        }
        columns.push(Arc::new(builder.finish()));
    }
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Decodes a segment back into its rows, in order. Blocking (CPU).
pub fn decode(bytes: Bytes) -> Result<Vec<ColdRow>, ColdError> {
    let mut rows = Vec::new();
    for batch in batches(bytes)? {
        rows.extend(rows_of(&batch?)?);
    }
    Ok(rows)
}

/// The rows of one record batch of a segment. Blocking (CPU).
pub fn rows_of(batch: &RecordBatch) -> Result<Vec<ColdRow>, ColdError> {
    let mut rows = Vec::with_capacity(batch.num_rows());
    {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| ColdError::Corrupt(format!("segment has no column `{name}`")))
        };
        let texts = |name: &str| -> Result<StringArray, ColdError> {
            let array = column(name)?;
            array
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| ColdError::Corrupt(format!("column `{name}` is not text")))
        };
        let times = |name: &str| -> Result<TimestampMicrosecondArray, ColdError> {
            let array = column(name)?;
            array
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .cloned()
                .ok_or_else(|| ColdError::Corrupt(format!("column `{name}` is not a time")))
        };
        let numbers = |name: &str| -> Result<UInt64Array, ColdError> {
            let array = column(name)?;
            array
                .as_any()
                .downcast_ref::<UInt64Array>()
                .cloned()
                .ok_or_else(|| ColdError::Corrupt(format!("column `{name}` is not a number")))
        };
        let (seq, user_hash) = (numbers("seq")?, numbers("user_hash")?);
        let [message_id, kind, name, user_id, anonymous_id, group_id, previous_id] = [
            "message_id",
            "type",
            "event",
            "user_id",
            "anonymous_id",
            "group_id",
            "previous_id",
        ]
        .map(texts);
        let [endpoint, library_name, library_version, client_ip, batch_id] = [
            "endpoint",
            "library_name",
            "library_version",
            "client_ip",
            "batch_id",
        ]
        .map(texts);
        let [properties, traits, context, integrations, extra] =
            ["properties", "traits", "context", "integrations", "extra"].map(texts);
        let [timestamp, original_timestamp, sent_at, received_at] =
            ["timestamp", "original_timestamp", "sent_at", "received_at"].map(times);
        let (message_id, kind, name, user_id, anonymous_id) =
            (message_id?, kind?, name?, user_id?, anonymous_id?);
        let (group_id, previous_id, endpoint, library_name) =
            (group_id?, previous_id?, endpoint?, library_name?);
        let (library_version, client_ip, batch_id) = (library_version?, client_ip?, batch_id?);
        let (properties, traits, context, integrations, extra) =
            (properties?, traits?, context?, integrations?, extra?);
        let (timestamp, original_timestamp, sent_at, received_at) =
            (timestamp?, original_timestamp?, sent_at?, received_at?);
        let flags = column("flags")?
            .as_any()
            .downcast_ref::<UInt8Array>()
            .cloned()
            .ok_or_else(|| ColdError::Corrupt("column `flags` is not a byte".into()))?;
        // Columns added after the first layout: absent from older segments.
        let weights = batch
            .column_by_name("weight")
            .and_then(|array| array.as_any().downcast_ref::<UInt32Array>().cloned());
        let derived: Vec<(&str, Option<StringArray>)> = DERIVED_COLUMNS
            .iter()
            .map(|(name, key)| {
                let array = batch
                    .column_by_name(name)
                    .and_then(|array| array.as_any().downcast_ref::<StringArray>().cloned());
                (*key, array)
            })
            .collect();
        let text =
            |array: &StringArray, i: usize| array.is_valid(i).then(|| array.value(i).to_string());
        let time =
            |array: &TimestampMicrosecondArray, i: usize| array.is_valid(i).then(|| array.value(i));
        for i in 0..batch.num_rows() {
            let kind = EventKind::parse(kind.value(i))
                .ok_or_else(|| ColdError::Corrupt(format!("unknown type {:?}", kind.value(i))))?;
            let extra = match text(&extra, i) {
                Some(json) => serde_json::from_str(&json)
                    .map_err(|e| ColdError::Corrupt(format!("column `extra`: {e}")))?,
                None => Vec::new(),
            };
            let batch_id = uuid::Uuid::parse_str(batch_id.value(i))
                .map_err(|e| ColdError::Corrupt(format!("column `batch_id`: {e}")))?
                .as_u128();
            let weight = weights.as_ref().map_or(1, |w| w.value(i));
            let fields: serde_json::Map<String, serde_json::Value> = (derived.iter())
                .filter_map(|(key, array)| {
                    let value = text(array.as_ref()?, i)?;
                    Some((key.to_string(), serde_json::Value::String(value)))
                })
                .collect();
            let extras = (weight != 1 || !fields.is_empty()).then(|| EventExtras {
                weight,
                derived: (!fields.is_empty())
                    .then(|| serde_json::Value::Object(fields).to_string()),
            });
            rows.push(ColdRow {
                extras,
                seq: seq.value(i),
                batch_id,
                endpoint: endpoint.value(i).to_string(),
                client_ip: text(&client_ip, i),
                event: StoredEvent {
                    kind,
                    message_id: message_id.value(i).to_string(),
                    name: text(&name, i),
                    user_id: text(&user_id, i),
                    anonymous_id: text(&anonymous_id, i),
                    group_id: text(&group_id, i),
                    previous_id: text(&previous_id, i),
                    timestamp: timestamp.value(i),
                    original_timestamp: time(&original_timestamp, i),
                    sent_at: time(&sent_at, i),
                    received_at: received_at.value(i),
                    user_hash: user_hash.value(i),
                    library_name: text(&library_name, i),
                    library_version: text(&library_version, i),
                    flags: flags.value(i),
                    properties: text(&properties, i),
                    traits: text(&traits, i),
                    context: text(&context, i),
                    integrations: text(&integrations, i),
                    extra,
                },
            });
        }
    }
    Ok(rows)
}
