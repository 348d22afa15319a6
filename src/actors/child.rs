//! Supervised children: a child actor built from a factory, behind a mailbox that outlives it.
//!
//! A supervisor registers each child once ([`Children::register`]): the registry makes the
//! child's [`Mailbox`], which senders keep for the supervisor's whole life, and a queue behind it
//! that the running instance of the child reads as a stream. When an instance dies (a panic in a
//! handler aborts its task), the queue stays with the registry: [`Children::check`] notices, and
//! after a backoff builds a new instance from the factory, which reads on from the same queue.
//! Messages sent meanwhile wait in the queue, bounded by its capacity; only the message being
//! handled when the instance died is lost (its reply channel closes, so nothing unacknowledged is
//! reported as done).
//!
//! The backoff doubles on repeated failures up to a maximum and starts again from the minimum
//! once a child has stayed up [`HEALTHY_AFTER`]. Each child's [`ChildStatus`] (running, restarts,
//! restart pending) is shared with the pipeline handle and exported as metrics.
//!
//! Dropping the registry (the supervisor stopped or died) closes every queue: each child handles
//! what is queued, then its stream ends and it stops, timers and all.

use std::any::Any;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, AsyncContext, Context, StreamHandler};
use tokio::sync::mpsc;

use crate::telemetry;

/// A child that stayed up this long is considered healthy: the next failure starts the backoff
/// from the minimum again.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// An actor a supervisor runs as a child: it reads its messages from its [`Mailbox`]'s queue,
/// as a stream. Its `finished` (end of the stream) must stop it; actix's default does.
pub trait ChildActor: Actor<Context = Context<Self>> + StreamHandler<Self::Message> {
    type Message: Send + 'static;
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRefused {
    /// The queue is at capacity.
    Full,
    /// The child's supervisor has stopped.
    Closed,
}

/// What a child is doing, shared between the registry and anyone holding its mailbox.
#[derive(Debug)]
pub struct ChildStatus {
    name: &'static str,
    running: AtomicBool,
    restart_pending: AtomicBool,
    restarts: AtomicU64,
}

/// A snapshot of a [`ChildStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildState {
    pub name: &'static str,
    pub running: bool,
    pub restart_pending: bool,
    pub restarts: u64,
}

impl ChildStatus {
    pub fn state(&self) -> ChildState {
        ChildState {
            name: self.name,
            running: self.running.load(Ordering::Acquire),
            restart_pending: self.restart_pending.load(Ordering::Acquire),
            restarts: self.restarts.load(Ordering::Acquire),
        }
    }

    /// True from the moment a failed instance is noticed until its replacement runs. (A child
    /// registered but not yet started is not restarting: its messages wait for the start.)
    pub fn is_restarting(&self) -> bool {
        self.restart_pending.load(Ordering::Acquire)
    }
}

/// The stable address of a child: the same across restarts of the actor behind it.
pub struct Mailbox<M> {
    queue: mpsc::Sender<M>,
    status: Arc<ChildStatus>,
}

impl<M> Clone for Mailbox<M> {
    fn clone(&self) -> Self {
        Mailbox {
            queue: self.queue.clone(),
            status: Arc::clone(&self.status),
        }
    }
}

impl<M> Mailbox<M> {
    /// Queues a message without waiting; it is handled by whichever instance of the child runs.
    pub fn try_send(&self, message: M) -> Result<(), (SendRefused, M)> {
        self.queue.try_send(message).map_err(|error| match error {
            mpsc::error::TrySendError::Full(message) => (SendRefused::Full, message),
            mpsc::error::TrySendError::Closed(message) => (SendRefused::Closed, message),
        })
    }

    pub fn status(&self) -> &Arc<ChildStatus> {
        &self.status
    }
}

/// The receiving end of a child's queue, kept by the registry; each instance of the child reads
/// it through an [`Inbox`]. With it, the waker of the instance waiting on it: closing the queue
/// from the registry must wake that instance, so that it sees the end of its stream and stops
/// (a receiver closed by another than its reader would not wake the reader).
type Queue<M> = Arc<Mutex<Receiving<M>>>;

struct Receiving<M> {
    receiver: mpsc::Receiver<M>,
    waiting: Option<Waker>,
}

fn lock<M>(queue: &Queue<M>) -> MutexGuard<'_, Receiving<M>> {
    // The lock is only held inside `poll_next` and `close`, which do not panic.
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One instance's view of its child's queue.
struct Inbox<M>(Queue<M>);

impl<M> futures_util::Stream for Inbox<M> {
    type Item = M;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<M>> {
        let mut queue = lock(&self.0);
        let polled = queue.receiver.poll_recv(cx);
        if polled.is_pending() {
            queue.waiting = Some(cx.waker().clone());
        }
        polled
    }
}

/// A registered child, whatever its actor type.
trait Slot {
    fn status(&self) -> &Arc<ChildStatus>;
    fn alive(&self) -> bool;
    fn start(&mut self);
    fn close(&mut self);
    fn as_any(&self) -> &dyn Any;
}

struct TypedSlot<A: ChildActor> {
    factory: Box<dyn Fn() -> A + Send>,
    queue: Queue<A::Message>,
    addr: Option<Addr<A>>,
    status: Arc<ChildStatus>,
}

impl<A: ChildActor> Slot for TypedSlot<A> {
    fn status(&self) -> &Arc<ChildStatus> {
        &self.status
    }

    fn alive(&self) -> bool {
        self.addr.as_ref().is_some_and(Addr::connected)
    }

    fn start(&mut self) {
        let inbox = Inbox(Arc::clone(&self.queue));
        let actor = (self.factory)();
        self.addr = Some(A::create(move |ctx| {
            ctx.add_stream(inbox);
            actor
        }));
        self.status.running.store(true, Ordering::Release);
    }

    fn close(&mut self) {
        let waiting = {
            let mut queue = lock(&self.queue);
            queue.receiver.close();
            queue.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
        self.addr = None;
        self.status.running.store(false, Ordering::Release);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Restart bookkeeping of one child.
struct Restarts {
    slot: Box<dyn Slot + Send>,
    started: Instant,
    backoff: Duration,
}

/// A supervisor's children, in registration order (which is also their start order).
pub struct Children {
    tenant_label: String,
    backoff_min: Duration,
    backoff_max: Duration,
    children: Vec<Restarts>,
}

impl Children {
    pub fn new(tenant_label: String, backoff_min: Duration, backoff_max: Duration) -> Children {
        Children {
            tenant_label,
            backoff_min,
            backoff_max,
            children: Vec::new(),
        }
    }

    /// Adds a child, not yet started: `factory` builds each instance, `capacity` bounds its
    /// queue. Returns the child's mailbox, valid from now on (messages wait for the start).
    pub fn register<A: ChildActor>(
        &mut self,
        name: &'static str,
        capacity: usize,
        factory: impl Fn() -> A + Send + 'static,
    ) -> Mailbox<A::Message> {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        let status = Arc::new(ChildStatus {
            name,
            running: AtomicBool::new(false),
            restart_pending: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
        });
        self.children.push(Restarts {
            slot: Box::new(TypedSlot {
                factory: Box::new(factory),
                queue: Arc::new(Mutex::new(Receiving {
                    receiver,
                    waiting: None,
                })),
                addr: None,
                status: Arc::clone(&status),
            }),
            started: Instant::now(),
            backoff: self.backoff_min,
        });
        Mailbox { queue, status }
    }

    /// Every child's status, in registration order.
    pub fn statuses(&self) -> Vec<Arc<ChildStatus>> {
        self.children
            .iter()
            .map(|child| Arc::clone(child.slot.status()))
            .collect()
    }

    /// Starts every child, in registration order, on the current arbiter.
    pub fn start_all(&mut self) {
        for child in &mut self.children {
            child.slot.start();
            child.started = Instant::now();
        }
    }

    /// Schedules a rebuild of every child found dead, each after its backoff. `children` finds
    /// this registry in the supervisor `S` when the rebuild is due.
    pub fn check<S>(&mut self, ctx: &mut Context<S>, children: fn(&mut S) -> &mut Children)
    where
        S: Actor<Context = Context<S>>,
    {
        for index in 0..self.children.len() {
            let child = &mut self.children[index];
            let status = Arc::clone(child.slot.status());
            if child.slot.alive() || status.restart_pending.load(Ordering::Acquire) {
                continue;
            }
            status.running.store(false, Ordering::Release);
            status.restart_pending.store(true, Ordering::Release);
            if child.started.elapsed() >= HEALTHY_AFTER {
                child.backoff = self.backoff_min;
            }
            let delay = child.backoff;
            child.backoff = (child.backoff * 2).min(self.backoff_max);
            status.restarts.fetch_add(1, Ordering::AcqRel);
            telemetry::actor_restarted(&self.tenant_label, status.name, delay);
            ctx.run_later(delay, move |supervisor, _ctx| {
                let registry = children(supervisor);
                if let Some(child) = registry.children.get_mut(index) {
                    child.slot.start();
                    child.started = Instant::now();
                    status.restart_pending.store(false, Ordering::Release);
                }
            });
        }
        for child in &self.children {
            let state = child.slot.status().state();
            telemetry::child_running(&self.tenant_label, state.name, state.running);
        }
    }

    /// The running instance of the child `name`, if it is of type `A` (for tests).
    pub fn addr<A: ChildActor>(&self, name: &str) -> Option<Addr<A>> {
        self.children
            .iter()
            .filter(|child| child.slot.status().name == name)
            .find_map(|child| child.slot.as_any().downcast_ref::<TypedSlot<A>>())
            .and_then(|slot| slot.addr.clone())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.children {
            child.slot.close();
            telemetry::child_running(&self.tenant_label, child.slot.status().name, false);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use actix::{ActorContext, Handler, Message};

    /// A child with a timer (so it would not stop by itself, and is not woken by it during the
    /// test) that records what it handles.
    struct Recorder {
        seen: Arc<Mutex<Vec<u32>>>,
    }

    impl Actor for Recorder {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            ctx.run_interval(Duration::from_secs(3600), |_, _| {});
        }
    }

    impl ChildActor for Recorder {
        type Message = u32;
    }

    impl StreamHandler<u32> for Recorder {
        fn handle(&mut self, message: u32, _ctx: &mut Context<Self>) {
            if message == 0 {
                panic!("injected failure");
            }
            self.seen.lock().unwrap().push(message);
        }
    }

    /// Stands in for a supervisor: holds the registry, checks it on a heartbeat.
    struct Holder {
        children: Option<Children>,
    }

    impl Actor for Holder {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            if let Some(children) = &mut self.children {
                children.start_all();
            }
            ctx.run_interval(Duration::from_millis(10), |holder, ctx| {
                if let Some(children) = &mut holder.children {
                    children.check(ctx, |holder: &mut Holder| holder.children.as_mut().unwrap());
                }
            });
        }
    }

    struct Release;

    impl Message for Release {
        type Result = ();
    }

    impl Handler<Release> for Holder {
        type Result = ();
        fn handle(&mut self, _: Release, ctx: &mut Context<Self>) {
            self.children = None;
            ctx.stop();
        }
    }

    struct Running;

    impl Message for Running {
        type Result = Option<actix::Addr<Recorder>>;
    }

    impl Handler<Running> for Holder {
        type Result = actix::MessageResult<Running>;
        fn handle(&mut self, _: Running, _ctx: &mut Context<Self>) -> Self::Result {
            actix::MessageResult(self.children.as_ref().and_then(|c| c.addr("recorder")))
        }
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if done() {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{what}");
    }

    #[actix_rt::test]
    async fn the_mailbox_outlives_a_failed_instance_and_the_registry_stops_its_children() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut children = Children::new(
            "test".into(),
            Duration::from_millis(50),
            Duration::from_millis(50),
        );
        let mailbox = children.register("recorder", 16, {
            let seen = Arc::clone(&seen);
            move || Recorder {
                seen: Arc::clone(&seen),
            }
        });
        // Sent before the child runs: waits in the queue.
        mailbox.try_send(1).unwrap();
        let holder = Holder {
            children: Some(children),
        }
        .start();
        let status = Arc::clone(mailbox.status());
        eventually("first message handled", || *seen.lock().unwrap() == [1]).await;
        let first = holder.send(Running).await.unwrap().unwrap();
        assert!(status.state().running);

        // The instance dies on message 0; 2 and 3 are sent while it is down.
        mailbox.try_send(0).unwrap();
        eventually("instance gone", || !first.connected()).await;
        mailbox.try_send(2).unwrap();
        mailbox.try_send(3).unwrap();
        eventually("rebuilt and drained", || *seen.lock().unwrap() == [1, 2, 3]).await;
        let state = status.state();
        assert_eq!(
            (state.restarts, state.running, state.restart_pending),
            (1, true, false)
        );
        let second = holder.send(Running).await.unwrap().unwrap();
        assert!(second.connected());

        // The registry goes: the child, timer and all, stops, and nothing more is queued.
        holder.send(Release).await.unwrap();
        eventually("child stopped", || !second.connected()).await;
        assert_eq!(mailbox.try_send(4).unwrap_err().0, SendRefused::Closed);
        assert!(!status.state().running);
    }

    #[test]
    fn a_full_queue_refuses_without_waiting() {
        let mut children = Children::new("test".into(), Duration::ZERO, Duration::ZERO);
        let mailbox = children.register("recorder", 1, || Recorder {
            seen: Arc::default(),
        });
        mailbox.try_send(1).unwrap();
        assert_eq!(mailbox.try_send(2).unwrap_err(), (SendRefused::Full, 2));
    }
}
