//! The dead-letter store: events refused by the tenant's tracking plan, kept to be inspected
//! and replayed (see `crate::deadletter`). Keyspace `deadletters`, key `tenant ‖ received_at ‖
//! batch id ‖ position in the request` (big-endian, so a tenant's letters are in time order),
//! value the letter's record (JSON).
//!
//! The log writer stages new letters with the log entries of the same group ([`stage`]), so a
//! letter is durable when the request that sent it is answered. Replays and upkeep change
//! letters with writes of their own that persist before they return.
//!
//! Each tenant's letters are bounded by age and by size ([`enforce_limits`]); the size is kept
//! per tenant in memory ([`DeadLetterSizes`]), from one scan of the tenant's letters on first
//! use.

use std::sync::Arc;

use dashmap::DashMap;

use crate::event::Micros;
use crate::ids::TenantId;
use crate::storage::{Storage, StorageError};

/// A letter's key.
pub type LetterKey = [u8; 36];

/// The position of a request's batch record: the batch-level objects its letters share, stored
/// once beside them (see `crate::deadletter`), not once per letter.
pub const BATCH_POSITION: u32 = u32::MAX;

/// The key of the batch record of the request `letter` came with.
pub fn batch_key(letter: &LetterKey) -> LetterKey {
    let mut key = *letter;
    key[32..].copy_from_slice(&BATCH_POSITION.to_be_bytes());
    key
}

/// Whether `key` is a batch record's, not a letter's.
pub fn is_batch_record(key: &[u8]) -> bool {
    key.get(32..36) == Some(&BATCH_POSITION.to_be_bytes()[..])
}

/// The value at `key`, if any. Blocking.
pub fn get(storage: &Storage, key: &LetterKey) -> Result<Option<fjall::Slice>, StorageError> {
    storage
        .deadletters
        .get(key)
        .map_err(StorageError::engine("reading a dead letter"))
}

pub fn key(tenant: TenantId, received_at: Micros, batch_id: u128, position: u32) -> LetterKey {
    let mut key = [0u8; 36];
    key[..8].copy_from_slice(&tenant.0.to_be_bytes());
    // Receipt times are after 1970: as unsigned they sort like the times.
    key[8..16].copy_from_slice(&(received_at.max(0) as u64).to_be_bytes());
    key[16..32].copy_from_slice(&batch_id.to_be_bytes());
    key[32..].copy_from_slice(&position.to_be_bytes());
    key
}

fn time_bound(tenant: TenantId, at: Micros) -> [u8; 16] {
    let mut bound = [0u8; 16];
    bound[..8].copy_from_slice(&tenant.0.to_be_bytes());
    bound[8..].copy_from_slice(&(at.max(0) as u64).to_be_bytes());
    bound
}

/// The receipt time in a letter's key.
pub fn key_time(key: &[u8]) -> Micros {
    key.get(8..16)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, |b| {
            i64::try_from(u64::from_be_bytes(b)).unwrap_or(i64::MAX)
        })
}

/// Bytes of each tenant's letters (keys and values), once known.
#[derive(Clone, Default)]
pub struct DeadLetterSizes(Arc<DashMap<TenantId, u64>>);

impl DeadLetterSizes {
    fn add(&self, tenant: TenantId, bytes: u64) {
        if let Some(mut total) = self.0.get_mut(&tenant) {
            *total += bytes;
        }
    }

    fn sub(&self, tenant: TenantId, bytes: u64) {
        if let Some(mut total) = self.0.get_mut(&tenant) {
            *total = total.saturating_sub(bytes);
        }
    }

    /// The tenant's total, scanning its letters the first time. Blocking.
    fn total(&self, storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
        if let Some(total) = self.0.get(&tenant) {
            return Ok(*total);
        }
        let entry = self.0.entry(tenant);
        if let dashmap::Entry::Occupied(total) = &entry {
            return Ok(*total.get());
        }
        let mut total = 0u64;
        for guard in storage.deadletters.prefix(tenant.0.to_be_bytes()) {
            let (key, value) = guard
                .into_inner()
                .map_err(StorageError::engine("measuring dead letters"))?;
            total += (key.len() + value.len()) as u64;
        }
        entry.insert(total);
        Ok(total)
    }

    fn forget(&self, tenant: TenantId) {
        self.0.remove(&tenant);
    }
}

/// Adds a letter without persisting it: the log writer's group commit persists it.
pub(crate) fn stage(
    storage: &Storage,
    tenant: TenantId,
    key: &LetterKey,
    value: &[u8],
) -> Result<(), StorageError> {
    storage
        .deadletters
        .insert(key, value)
        .map_err(StorageError::engine("staging a dead letter"))?;
    storage
        .deadletter_sizes
        .add(tenant, (key.len() + value.len()) as u64);
    Ok(())
}

/// Replaces the values of existing letters and removes others, durably. Blocking.
pub fn update(
    storage: &Storage,
    tenant: TenantId,
    replaced: &[(LetterKey, Vec<u8>)],
    removed: &[LetterKey],
) -> Result<(), StorageError> {
    let mut batch = storage.batch();
    let mut freed = 0u64;
    let mut added = 0u64;
    for (key, value) in replaced {
        if let Some(old) = storage
            .deadletters
            .get(key)
            .map_err(StorageError::engine("reading a dead letter"))?
        {
            freed += old.len() as u64;
            added += value.len() as u64;
            batch.insert(&storage.deadletters, key.to_vec(), value.clone());
        }
    }
    for key in removed {
        if let Some(old) = storage
            .deadletters
            .get(key)
            .map_err(StorageError::engine("reading a dead letter"))?
        {
            freed += (key.len() + old.len()) as u64;
            batch.remove(&storage.deadletters, key.to_vec());
        }
    }
    batch
        .commit()
        .map_err(StorageError::engine("updating dead letters"))?;
    storage.persist(true)?;
    storage.deadletter_sizes.add(tenant, added);
    storage.deadletter_sizes.sub(tenant, freed);
    Ok(())
}

/// A page of letters, newest first.
pub struct Page {
    pub letters: Vec<(LetterKey, fjall::Slice)>,
    /// Where the next page starts (exclusive), when the scan stopped before the range's end.
    pub next: Option<LetterKey>,
}

/// Which letters a page holds.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    /// Received in `[from, to)`.
    pub from: Micros,
    pub to: Micros,
    /// Below this key (the `next` of a previous page).
    pub before: Option<&'a LetterKey>,
    /// Most letters returned.
    pub limit: usize,
    /// Most letters examined (a page may then be short, or empty, with a `next`).
    pub budget: usize,
}

/// The letters of `request` that `keep` accepts, newest first. Blocking.
pub fn page(
    storage: &Storage,
    tenant: TenantId,
    request: PageRequest<'_>,
    mut keep: impl FnMut(&[u8]) -> bool,
) -> Result<Page, StorageError> {
    let PageRequest {
        from,
        to,
        before,
        limit,
        budget,
    } = request;
    let low = time_bound(tenant, from).to_vec();
    let mut high = time_bound(tenant, to).to_vec();
    if let Some(before) = before {
        if before[..8] == tenant.0.to_be_bytes() && before[..] < high[..] {
            high = before.to_vec();
        }
    }
    let mut letters = Vec::new();
    let mut examined = 0usize;
    let mut last: Option<LetterKey> = None;
    for guard in storage.deadletters.range(low..high).rev() {
        if letters.len() >= limit || examined >= budget {
            return Ok(Page {
                letters,
                next: last,
            });
        }
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading dead letters"))?;
        let Ok(key) = LetterKey::try_from(&key[..]) else {
            continue;
        };
        examined += 1;
        last = Some(key);
        if !is_batch_record(&key) && keep(&value) {
            letters.push((key, value));
        }
    }
    Ok(Page {
        letters,
        next: None,
    })
}

/// Deletes the tenant's letters received before `oldest`, then the oldest ones beyond
/// `max_bytes`, with the batch records stored beside them. Returns how many letters it deleted
/// (batch records are not counted). Blocking.
pub fn enforce_limits(
    storage: &Storage,
    tenant: TenantId,
    oldest: Micros,
    max_bytes: u64,
) -> Result<u64, StorageError> {
    let low = time_bound(tenant, 0).to_vec();
    let high = time_bound(tenant, oldest).to_vec();
    let mut removed = 0u64;
    let mut freed = 0u64;
    let mut batch = storage.batch();
    for guard in storage.deadletters.range(low..high) {
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("expiring dead letters"))?;
        freed += (key.len() + value.len()) as u64;
        removed += u64::from(!is_batch_record(&key));
        batch.remove(&storage.deadletters, key);
    }
    let mut total = storage
        .deadletter_sizes
        .total(storage, tenant)?
        .saturating_sub(freed);
    if total > max_bytes {
        for guard in storage.deadletters.prefix(tenant.0.to_be_bytes()) {
            if total <= max_bytes {
                break;
            }
            let (key, value) = guard
                .into_inner()
                .map_err(StorageError::engine("trimming dead letters"))?;
            if key_time(&key) < oldest {
                continue; // Already removed above.
            }
            let bytes = (key.len() + value.len()) as u64;
            total = total.saturating_sub(bytes);
            freed += bytes;
            removed += u64::from(!is_batch_record(&key));
            batch.remove(&storage.deadletters, key);
        }
    }
    if !batch.is_empty() {
        batch
            .commit()
            .map_err(StorageError::engine("deleting dead letters"))?;
        storage.persist(true)?;
        storage.deadletter_sizes.sub(tenant, freed);
    }
    Ok(removed)
}

/// Removes the tenant's letters whose value `matches`, durably; returns how many. Blocking.
pub fn remove_matching(
    storage: &Storage,
    tenant: TenantId,
    mut matches: impl FnMut(&[u8]) -> bool,
) -> Result<u64, StorageError> {
    let mut doomed: Vec<LetterKey> = Vec::new();
    for guard in storage.deadletters.prefix(tenant.0.to_be_bytes()) {
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("scanning dead letters"))?;
        if is_batch_record(&key) {
            continue;
        }
        if let (Ok(key), true) = (LetterKey::try_from(&key[..]), matches(&value)) {
            doomed.push(key);
        }
    }
    for chunk in doomed.chunks(4096) {
        update(storage, tenant, &[], chunk)?;
    }
    Ok(doomed.len() as u64)
}

/// Removes every letter of the tenant. Blocking.
pub fn delete_all(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    let removed = super::purge_prefix(storage, &storage.deadletters, tenant)?;
    storage.deadletter_sizes.forget(tenant);
    Ok(removed)
}

/// Bytes the tenant's letters take (keys and values). Blocking on first use.
pub fn bytes(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    storage.deadletter_sizes.total(storage, tenant)
}
