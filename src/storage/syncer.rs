//! The second half of the log writer's group commit: the `log-sync` thread.
//!
//! The writer thread stages a group (its entries and heads written, the journal flushed to the
//! OS) and hands it here, then goes straight on to the next group while this thread fsyncs
//! ([`EventLog::sync`], which does not hold the writes up). One fsync covers every group handed
//! over before it started: while one runs, the next groups queue up and share the next one, so
//! the disk and the writer are both kept busy and the fsyncs grow with the load.
//!
//! Groups are answered strictly in the order they were staged, each after a sync that started
//! after its staging; only then do their tenants' heads advance and their dedup keys go to the
//! ingest thread. After a failed sync nothing more is answered as written: the failed groups
//! and every later one get the error, and the writer refuses further appends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::storage::dedup_ingest::{KeyGroup, ToIngest};
use crate::storage::event_log::EventLog;
use crate::storage::health::ThreadHealth;
use crate::storage::writer::{AppendOutcome, AppendReply, LogHeads, Timing};
use crate::storage::StorageError;
use crate::telemetry;

/// The thread's name, in `/readyz` when it dies.
const THREAD: &str = "log-sync";

/// Groups staged and not yet synced, at most: beyond, the writer waits (its queue then fills
/// and the next group is larger).
const MAX_STAGED_GROUPS: usize = 64;

/// One request of a staged group: its reply, when it was queued, and its outcome so far.
pub(crate) type Staged = (AppendReply, Instant, Result<AppendOutcome, StorageError>);

/// A group the writer staged.
pub(crate) struct StagedGroup {
    pub replies: Vec<Staged>,
    /// The group's new dedup keys and each tenant's last sequence, numbered (`None`: nothing
    /// was appended).
    pub keys: Option<KeyGroup>,
    pub group_started: Instant,
    /// When the writer started committing it (its writes were done).
    pub commit_started: Instant,
}

pub(crate) enum ToSync {
    Group(StagedGroup),
    /// Answered once every group handed over before is synced and answered.
    Barrier(Sender<()>),
    /// Sends to the ingest thread after the groups before (`ToIngest::Now`, an import's keys).
    Ingest(ToIngest),
}

/// What the sync thread shares with the writer.
#[derive(Clone)]
pub(crate) struct SyncShared {
    pub log: Arc<dyn EventLog>,
    pub heads: LogHeads,
    pub key_groups: Sender<ToIngest>,
    pub healthy: Arc<AtomicBool>,
    /// Why persisting failed, once it has (for the writer's refusals).
    pub failure: Arc<Mutex<Option<String>>>,
    /// fsync (durable mode), or only the flush to the OS the writer did.
    pub fsync: bool,
    pub fsync_delay: Duration,
    /// Where the thread reports its death (it then clears `healthy`).
    pub health: Arc<ThreadHealth>,
}

pub(crate) struct Syncer {
    queue: Sender<ToSync>,
    thread: Option<JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Syncer {
    pub(crate) fn start(shared: SyncShared) -> std::io::Result<Syncer> {
        let (queue, staged) = crossbeam_channel::bounded(MAX_STAGED_GROUPS);
        let (healthy, failure) = (Arc::clone(&shared.healthy), Arc::clone(&shared.failure));
        let thread = std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || {
                // A panic here clears `healthy`: the writer then refuses appends.
                let _watch = shared
                    .health
                    .watch(THREAD, Some(Arc::clone(&shared.healthy)));
                run(&shared, &staged);
            })?;
        Ok(Syncer {
            queue,
            thread: Some(thread),
            healthy,
            failure,
        })
    }

    /// Hands a message over (waiting while `MAX_STAGED_GROUPS` are staged). If the thread has
    /// died, nothing more is written: a group is refused at once.
    pub(crate) fn send(&self, message: ToSync) {
        let Err(crossbeam_channel::SendError(message)) = self.queue.send(message) else {
            return;
        };
        let reason = "the log sync thread stopped".to_string();
        (self.failure.lock().unwrap_or_else(|p| p.into_inner())).get_or_insert(reason.clone());
        self.healthy.store(false, Ordering::Release);
        if let ToSync::Group(group) = message {
            refuse(group.replies, &reason);
        }
    }

    /// Waits until everything handed over before is synced and answered.
    pub(crate) fn drain(&self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        self.send(ToSync::Barrier(done));
        let _ = wait.recv();
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has answered what was staged.
        let (closed, _) = crossbeam_channel::bounded(1);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("log sync thread panicked");
            }
        }
    }
}

fn run(shared: &SyncShared, staged: &Receiver<ToSync>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = staged.recv() {
        shared.health.checkpoint(THREAD);
        // Everything staged by now shares one sync.
        let mut batch = vec![first];
        batch.extend(staged.try_iter());
        let groups = batch
            .iter()
            .filter(|message| matches!(message, ToSync::Group(_)))
            .count();
        let sync_started = Instant::now();
        if groups > 0 && failed.is_none() && shared.fsync {
            let synced = shared.log.sync();
            if !shared.fsync_delay.is_zero() {
                std::thread::sleep(shared.fsync_delay);
            }
            if let Err(error) = synced {
                tracing::error!(%error, "persisting the log failed; refusing all further writes");
                let reason = error.to_string();
                *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                shared.healthy.store(false, Ordering::Release);
                failed = Some(reason);
            }
        }
        let committed = Instant::now();
        for message in batch {
            match message {
                ToSync::Group(group) => answer(shared, group, failed.as_deref(), committed),
                ToSync::Barrier(done) => {
                    let _ = done.send(());
                }
                ToSync::Ingest(message) => {
                    if failed.is_none() {
                        let _ = shared.key_groups.send(message);
                    }
                }
            }
        }
        if groups > 0 {
            telemetry::log_synced(groups, committed - sync_started);
        }
    }
}

/// Answers every request of a group with the reason its events are not durable.
pub(crate) fn refuse(replies: Vec<Staged>, reason: &str) {
    for (reply, _, _) in replies {
        reply(Err(StorageError::NotDurable(reason.to_string())));
    }
}

/// Answers a synced group (or, after a failure, refuses it) and passes its keys on.
fn answer(shared: &SyncShared, group: StagedGroup, failed: Option<&str>, committed: Instant) {
    let events: usize = (group.replies.iter())
        .filter_map(|(_, _, outcome)| outcome.as_ref().ok())
        .map(|outcome| outcome.accepted)
        .sum();
    telemetry::group_committed(
        group.replies.len(),
        events,
        committed - group.commit_started,
    );
    if let Some(reason) = failed {
        refuse(group.replies, reason);
        return;
    }
    for (tenant, head) in group.keys.iter().flat_map(|keys| &keys.heads) {
        shared.heads.advance(*tenant, *head);
    }
    for (reply, queued_at, mut outcome) in group.replies {
        if let Ok(outcome) = &mut outcome {
            outcome.timing = Some(Timing {
                queued_at,
                group_started: group.group_started,
                commit_started: group.commit_started,
                committed,
            });
        }
        reply(outcome);
    }
    if let Some(keys) = group.keys {
        // Fails only once the ingest thread has stopped on an error; it cleared `healthy`,
        // and the next append is refused.
        let _ = shared.key_groups.send(keys.into());
    }
}
