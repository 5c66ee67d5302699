//! The FIFO queue of requests waiting for a slot. Slots are handed over directly to the oldest
//! waiter, so a newcomer never overtakes a request that is already waiting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Slot;

#[derive(Debug)]
struct Waiter {
    id: u64,
    since: Instant,
    tx: oneshot::Sender<Slot>,
}

/// Waiting requests, oldest first.
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// Waiters plus requests about to enter; read without the lock on the hot path.
    len: AtomicUsize,
    next_id: AtomicU64,
    waiters: Mutex<VecDeque<Waiter>>,
}

/// How entering the queue ended.
pub(super) enum Entered<'a> {
    /// A slot was free after all.
    Served(Slot),
    /// The request waits; the ticket leaves the queue when dropped.
    Waiting(Ticket<'a>),
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Waiter>> {
        // A panic while holding this lock cannot leave the deque inconsistent (every critical
        // section is a single push, pop or remove), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len.load(Ordering::SeqCst) == 0
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Age of the oldest waiter.
    pub(super) fn oldest_age(&self) -> Option<Duration> {
        self.lock().front().map(|w| w.since.elapsed())
    }

    /// Join the queue unless a slot is free now (and nobody waits) or the queue holds
    /// `capacity` waiters already (`Err`).
    pub(super) fn enter(
        &self,
        capacity: usize,
        try_now: impl FnOnce() -> Option<Slot>,
    ) -> Result<Entered<'_>, ()> {
        let mut waiters = self.lock();
        // Announce before trying: a release that misses our attempt sees len > 0 and comes
        // to serve us (it blocks on the lock until we are in the deque).
        self.len.fetch_add(1, Ordering::SeqCst);
        if waiters.is_empty() {
            if let Some(slot) = try_now() {
                self.len.fetch_sub(1, Ordering::SeqCst);
                return Ok(Entered::Served(slot));
            }
        }
        if waiters.len() >= capacity {
            self.len.fetch_sub(1, Ordering::SeqCst);
            return Err(());
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        waiters.push_back(Waiter {
            id,
            since: Instant::now(),
            tx,
        });
        Ok(Entered::Waiting(Ticket {
            queue: self,
            id,
            rx,
        }))
    }

    /// Give slots from `try_now` to waiters, oldest first, while it yields them.
    pub(super) fn serve(&self, mut try_now: impl FnMut() -> Option<Slot>) {
        // Slots whose waiter is gone are dropped after unlocking: dropping one releases it,
        // which serves the queue again and needs the lock.
        let mut unclaimed = Vec::new();
        {
            let mut waiters = self.lock();
            while !waiters.is_empty() {
                let Some(slot) = try_now() else { break };
                let Some(waiter) = waiters.pop_front() else {
                    break;
                };
                self.len.fetch_sub(1, Ordering::SeqCst);
                if let Err(slot) = waiter.tx.send(slot) {
                    unclaimed.push(slot);
                }
            }
        }
        drop(unclaimed);
    }

    fn remove(&self, id: u64) {
        let mut waiters = self.lock();
        if let Some(pos) = waiters.iter().position(|w| w.id == id) {
            waiters.remove(pos);
            self.len.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A place in the queue; leaving (drop) removes it, so an aborted client frees its place.
pub(super) struct Ticket<'a> {
    queue: &'a Queue,
    id: u64,
    rx: oneshot::Receiver<Slot>,
}

impl Ticket<'_> {
    /// Wait up to `timeout` for a slot.
    pub(super) async fn wait(mut self, timeout: Duration) -> Option<Slot> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(slot) => slot.ok(),
            Err(_elapsed) => {
                self.queue.remove(self.id);
                // A slot may have been handed over just as the time ran out: use it.
                self.rx.try_recv().ok()
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.remove(self.id);
    }
}
