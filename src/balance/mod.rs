//! Endpoint choice and concurrency slots for one service: per-endpoint caps, the service-wide
//! cap, random / power-of-two-choices selection, and the FIFO queue for requests that wait.
//!
//! A [`Slot`] is the right to have one request in flight at one endpoint. It is released by
//! `Drop`, so every path that ends an exchange (success, error, client abort, panic, shutdown)
//! releases it exactly once.

mod adaptive;
mod budget;
mod endpoint;
mod hold;
mod members;
mod queue;
mod shape;
mod share;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;

pub use adaptive::{Adaptive, Answer, Bounds};
pub use budget::RetryBudget;
pub use endpoint::{Endpoint, InvalidEndpointUrl};
pub use hold::{HoldKind, Overload, StatusSet, Verdict};
pub use members::{members, Discovered, Found, Member, Source};
use queue::Queue;
pub use shape::Shape;
pub use share::{Share, HELD};

use crate::config::Balance;

/// `base` doubled `times` times (saturating; more than 16 doublings count as 16): the
/// back-offs of an endpoint that keeps refusing connections, saying it is full, or making
/// requests wait after a step up.
fn doubled(base: Duration, times: u32) -> Duration {
    base.saturating_mul(1 << times.min(16))
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every endpoint (or the service-wide cap) is full and the queue is full or disabled.
    EndpointsFull,
    /// The request waited `queue_timeout` in the queue without a slot freeing.
    QueueTimeout,
    /// The service has no endpoint, and none came while the request waited in the queue.
    NoEndpoints,
}

/// The slots of one service.
#[derive(Debug)]
pub struct Pool {
    shape: ArcSwap<Shape>,
    in_flight: AtomicU32,
    queue: Queue,
    /// How many retries the service's requests may still cause.
    pub retry_budget: RetryBudget,
}

impl Pool {
    /// A pool with the given shape.
    pub fn new(shape: Shape) -> Arc<Self> {
        Arc::new(Self {
            shape: ArcSwap::from_pointee(shape),
            in_flight: AtomicU32::new(0),
            queue: Queue::default(),
            retry_budget: RetryBudget::default(),
        })
    }

    /// The live shape.
    pub fn shape(&self) -> arc_swap::Guard<Arc<Shape>> {
        self.shape.load()
    }

    /// The live shape, owned.
    pub fn shape_snapshot(&self) -> Arc<Shape> {
        self.shape.load_full()
    }

    /// Replace the shape; waiting requests get any slot the new shape frees.
    pub fn set_shape(self: &Arc<Self>, shape: Shape) {
        self.shape.store(Arc::new(shape));
        self.wake();
    }

    /// Set the service's per-endpoint cap (autoscale of endpoint concurrency).
    pub fn set_default_cap(self: &Arc<Self>, cap: u32) {
        let shape = self.shape.load().with_default_cap(cap);
        self.set_shape(shape);
    }

    /// Set this replica's part of each cap (the fleet's replica set changed).
    pub fn set_share(self: &Arc<Self>, share: Share) {
        let shape = self.shape.load();
        if shape.share != share {
            let shape = shape.with_share(share);
            self.set_shape(shape);
        }
    }

    /// Requests in flight over all endpoints of the service.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests waiting in the queue now.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// How long the oldest waiting request has waited.
    pub fn queue_oldest_age(&self) -> Option<Duration> {
        self.queue.oldest_age()
    }

    /// A slot now, or after waiting in the FIFO queue when the shape allows it.
    pub async fn acquire(self: &Arc<Self>) -> Result<Slot, NoSlot> {
        let shape = self.shape.load_full();
        if self.queue.is_empty() {
            if let Some(slot) = self.try_acquire(&shape, None) {
                return Ok(slot);
            }
            // The failed attempt held a service slot for a moment; a waiter that arrived then
            // may have missed it.
            self.wake();
        }
        // Without endpoints a request waits like one that found them full: the first endpoint
        // to join (a scale-out from zero) serves the queue.
        let full = |shape: &Shape| match shape.endpoints.is_empty() {
            true => NoSlot::NoEndpoints,
            false => NoSlot::EndpointsFull,
        };
        if shape.queue_size == 0 {
            return Err(full(&shape));
        }
        let waiting = self
            .queue
            .enter(shape.queue_size as usize, || self.try_acquire(&shape, None))
            .map_err(|()| full(&shape))?;
        match waiting {
            queue::Entered::Served(slot) => Ok(slot),
            queue::Entered::Waiting(ticket) => match ticket.wait(shape.queue_timeout).await {
                Some(slot) => Ok(slot),
                None if self.shape.load().endpoints.is_empty() => Err(NoSlot::NoEndpoints),
                None => Err(NoSlot::QueueTimeout),
            },
        }
    }

    /// A slot at an endpoint other than `exclude`, without waiting (used to retry a request
    /// whose first endpoint refused the connection).
    pub fn try_acquire_other(self: &Arc<Self>, exclude: &Arc<Endpoint>) -> Option<Slot> {
        let shape = self.shape.load();
        self.try_acquire(&shape, Some(exclude))
    }

    /// Pick an endpoint with room and take a slot on it. A full endpoint is never picked
    /// while another has room; endpoints in back-off are used only when none is healthy.
    fn try_acquire(
        self: &Arc<Self>,
        shape: &Shape,
        exclude: Option<&Arc<Endpoint>>,
    ) -> Option<Slot> {
        if !self.take_service_slot(shape.local_cluster_cap()) {
            return None;
        }
        // Another request may take the chosen endpoint's last slot between the choice and the
        // increment; choose again then, a bounded number of times.
        for _ in 0..=shape.endpoints.len() {
            let Some(i) = choose(shape, exclude) else {
                break;
            };
            let endpoint = &shape.endpoints[i].0;
            let cap = shape.effective_cap(i);
            if let Some(load) = endpoint.try_take(cap) {
                return Some(Slot {
                    pool: Arc::clone(self),
                    endpoint: Arc::clone(endpoint),
                    load,
                    learns: shape.learns(i).map(|bounds| (bounds, cap)),
                });
            }
        }
        // No wake here: this runs under the queue lock when serving or entering the queue.
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        None
    }

    fn take_service_slot(&self, cap: u32) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    fn release_service_slot(self: &Arc<Self>) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.wake();
    }

    /// Hand free slots to waiting requests, oldest first: after a slot was released, the
    /// shape changed, or an endpoint can take more than before without either (its hold ended,
    /// it passed its health check).
    pub fn wake(self: &Arc<Self>) {
        if self.queue.is_empty() {
            return;
        }
        let shape = self.shape.load_full();
        self.queue.serve(|| self.try_acquire(&shape, None));
    }
}

/// Index of an endpoint with room: uniform among healthy ones (`random`), or the less loaded
/// of two such picks (`p2c`); among endpoints in back-off only when no endpoint is healthy.
fn choose(shape: &Shape, exclude: Option<&Arc<Endpoint>>) -> Option<usize> {
    let mut rng = rand::thread_rng();
    // Reservoir sampling keeps the choice uniform without allocating a candidate list.
    let mut healthy = Reservoir::default();
    let mut in_backoff = Reservoir::default();
    let mut any_healthy = false;
    for (i, (endpoint, _)) in shape.endpoints.iter().enumerate() {
        if exclude.is_some_and(|e| Arc::ptr_eq(e, endpoint)) || !endpoint.is_ready() {
            continue;
        }
        let is_healthy = endpoint.is_healthy();
        any_healthy |= is_healthy;
        if endpoint.in_flight() >= shape.effective_cap(i) {
            continue;
        }
        let reservoir = if is_healthy {
            &mut healthy
        } else {
            &mut in_backoff
        };
        reservoir.offer(i, &mut rng);
    }
    let picks = if any_healthy { healthy } else { in_backoff };
    match (shape.balance, picks.first, picks.second) {
        (Balance::P2c, Some(a), Some(b)) => {
            let load = |i: usize| shape.endpoints[i].0.in_flight();
            Some(if load(b) < load(a) { b } else { a })
        }
        (_, first, _) => first,
    }
}

/// Two distinct uniform picks from a stream of candidates.
#[derive(Default)]
struct Reservoir {
    seen: u32,
    first: Option<usize>,
    second: Option<usize>,
}

impl Reservoir {
    fn offer(&mut self, i: usize, rng: &mut impl Rng) {
        self.seen += 1;
        match self.seen {
            1 => self.first = Some(i),
            2 => {
                // Random order for the pair so `first` alone stays uniform.
                if rng.gen_bool(0.5) {
                    self.second = self.first.replace(i);
                } else {
                    self.second = Some(i);
                }
            }
            n => {
                let r = rng.gen_range(0..n);
                if r == 0 {
                    self.first = Some(i);
                } else if r == 1 {
                    self.second = Some(i);
                }
            }
        }
    }
}

/// The right to have one request in flight at one endpoint; released on drop.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<Pool>,
    endpoint: Arc<Endpoint>,
    /// In flight at the endpoint through this replica once taken, this one included.
    load: u32,
    /// While the endpoint's cap is learned: its bounds, and the slots this replica had there
    /// when this one was taken (taking the last is what "the cap was reached" means).
    learns: Option<(Bounds, u32)>,
}

impl Slot {
    /// The endpoint this slot is on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The endpoint answered a request sent at `sent` after `latency`, having worked on it:
    /// what its learned cap (if it has one) learns. The cap before and after, if it changed.
    pub fn learn_answer(
        &self,
        sent: tokio::time::Instant,
        latency: Duration,
    ) -> Option<(u32, u32)> {
        let (bounds, cap) = self.learns?;
        let answer = Answer {
            sent,
            latency,
            load: self.load,
            reached: self.load >= cap,
        };
        self.endpoint.adaptive.answered(answer, bounds)
    }

    /// The endpoint said it is full, or did not answer in time, to a request sent at `sent`.
    pub fn learn_overload(&self, sent: tokio::time::Instant) -> Option<(u32, u32)> {
        let (bounds, _) = self.learns?;
        self.endpoint.adaptive.overloaded(sent, bounds)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.endpoint.give_back();
        self.pool.release_service_slot();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` endpoints from the config file with no cap of their own.
    fn endpoints_members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                url: format!("http://127.0.0.1:{}", 9000 + i),
                host: None,
                own_cap: None,
                source: Source::Config,
            })
            .collect()
    }

    fn pool(caps: &[u32], queue_size: u32) -> Arc<Pool> {
        let endpoints = caps
            .iter()
            .enumerate()
            .map(|(i, cap)| {
                let url = format!("http://127.0.0.1:{}", 9000 + i);
                let endpoint = Arc::new(Endpoint::new(&url, None).unwrap());
                (endpoint, crate::config::Cap::Fixed(*cap))
            })
            .collect();
        let members = endpoints_members(caps.len());
        Pool::new(Shape {
            endpoints,
            cluster_cap: u32::MAX,
            share: Share::WHOLE,
            queue_size,
            queue_timeout: Duration::from_millis(200),
            balance: Balance::Random,
            members,
            slow_start: None,
            overload: Overload::default(),
            adaptive: Bounds {
                min: 1,
                max: 200,
                start: 20,
            },
        })
    }

    #[tokio::test]
    async fn caps_hold_and_slots_return() {
        let pool = pool(&[2, 3], 0);
        let mut slots = Vec::new();
        for _ in 0..5 {
            slots.push(pool.acquire().await.unwrap());
        }
        assert_eq!(pool.acquire().await.unwrap_err(), NoSlot::EndpointsFull);
        assert_eq!(pool.in_flight(), 5);
        slots.clear();
        assert_eq!(pool.in_flight(), 0);
        for (e, _) in &pool.shape().endpoints {
            assert_eq!(e.in_flight(), 0);
        }
    }

    #[tokio::test]
    async fn cluster_cap_bounds_the_sum() {
        let pool = pool(&[5, 5], 0);
        let config = crate::config::Config::parse(
            "[[service]]\nname = \"s\"\ncluster_max_concurrent = 7\nendpoints = []",
        )
        .unwrap();
        let mut shape = Shape::from_config(
            &config.services[0],
            &Discovered::default(),
            None,
            Share::WHOLE,
        )
        .unwrap();
        shape.endpoints = pool.shape().endpoints.clone();
        shape.members = endpoints_members(2);
        pool.set_shape(shape);
        let mut slots = Vec::new();
        while let Ok(s) = pool.acquire().await {
            slots.push(s);
        }
        assert_eq!(slots.len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_serves_in_arrival_order_then_times_out() {
        let pool = pool(&[1], 2);
        let held = pool.acquire().await.unwrap();
        let (p1, p2, p3) = (pool.clone(), pool.clone(), pool.clone());
        let first = tokio::spawn(async move { p1.acquire().await.map(|_| 1) });
        tokio::task::yield_now().await;
        let second = tokio::spawn(async move { p2.acquire().await.map(|_| 2) });
        tokio::task::yield_now().await;
        assert_eq!(pool.queue_len(), 2);
        // Queue full: the third is refused at once.
        assert_eq!(p3.acquire().await.unwrap_err(), NoSlot::EndpointsFull);
        drop(held);
        assert_eq!(first.await.unwrap(), Ok(1));
        assert_eq!(second.await.unwrap(), Ok(2));
        let held = pool.acquire().await.unwrap();
        let p4 = pool.clone();
        let late = tokio::spawn(async move { p4.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(late.await.unwrap(), Err(NoSlot::QueueTimeout));
        assert_eq!(pool.queue_len(), 0);
        drop(held);
        assert_eq!(pool.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_learned_cap_is_shared_among_replicas_like_a_fixed_one() {
        let pool = pool(&[1], 0);
        let mut shape = pool.shape().with_share(Share::at(1, 2));
        shape.endpoints[0].1 = crate::config::Cap::Auto;
        shape.endpoints[0].0.adaptive.follow(Some(shape.adaptive));
        pool.set_shape(shape);
        let shape = pool.shape();
        assert_eq!((shape.cap(0), shape.local_cap(0)), (20, 10));
        assert_eq!(shape.capacity(), 20, "capacity counts the fleet's cap");
        let mut slots = Vec::new();
        while let Ok(slot) = pool.acquire().await {
            slots.push(slot);
        }
        assert_eq!(slots.len(), 10, "this replica's half");
    }

    #[test]
    fn full_endpoint_never_chosen_while_another_has_room() {
        let pool = pool(&[1, 100], 0);
        let shape = pool.shape();
        assert_eq!(shape.endpoints[0].0.try_take(1), Some(1));
        for _ in 0..1000 {
            assert_eq!(choose(&shape, None), Some(1));
        }
        shape.endpoints[0].0.give_back();
    }
}
