//! Usage events: a bounded in-memory queue on the request path, drained in batches
//! by a background task into a [`UsageSink`].
//!
//! Enqueueing never blocks, never allocates beyond the event itself and never
//! wakes another thread: the drain runs every [`FLUSH_INTERVAL`] (sooner when the
//! queue is half full). When the
//! queue is full the event is counted as dropped (metrics, and a warning at most once
//! a second) rather than slowing requests; the stores that spill to disk instead
//! plug in behind the same [`UsageSink`] interface. A batch the sink refuses is
//! retried with backoff and kept in order; on shutdown the queue is closed and
//! drained, and every event already queued is handed to the sink.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use agora_config::usage::{TokenReport, UsageRecord};
pub use agora_usage::UsageSink;

/// Counts what it receives and logs one line per batch.
#[derive(Default)]
pub struct LogSink {
    pub events: AtomicU64,
    pub reports: AtomicU64,
    pub input_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
}

#[async_trait]
impl UsageSink for LogSink {
    async fn write(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        let (mut events, mut reports, mut input, mut output) = (0u64, 0u64, 0u64, 0u64);
        for record in batch {
            match record {
                UsageRecord::Event(e) => {
                    events += 1;
                    input += e.input_tokens.unwrap_or(0);
                    output += e.output_tokens.unwrap_or(0);
                }
                UsageRecord::Report(r) => {
                    reports += 1;
                    input += r.input_tokens;
                    output += r.output_tokens;
                }
                UsageRecord::Failure(_) => {}
            }
        }
        self.events.fetch_add(events, Ordering::Relaxed);
        self.reports.fetch_add(reports, Ordering::Relaxed);
        self.input_tokens.fetch_add(input, Ordering::Relaxed);
        self.output_tokens.fetch_add(output, Ordering::Relaxed);
        tracing::info!(
            events,
            reports,
            input_tokens = input,
            output_tokens = output,
            "usage batch"
        );
        Ok(())
    }
}

/// The request path's end of the queue.
#[derive(Clone)]
pub struct UsageQueue {
    tx: mpsc::Sender<UsageRecord>,
    stats: Arc<QueueStats>,
}

#[derive(Default)]
pub struct QueueStats {
    pub enqueued: AtomicU64,
    pub dropped: AtomicU64,
    pub written: AtomicU64,
    pub sink_errors: AtomicU64,
    pub sink_failing: AtomicBool,
    last_drop_warning_ms: AtomicI64,
    /// Wakes the drain early when the queue is half full.
    pressure: tokio::sync::Notify,
}

/// The background end of the queue.
pub struct Drain {
    rx: mpsc::Receiver<UsageRecord>,
    stats: Arc<QueueStats>,
    /// Largest batch handed to the sink at once.
    pub max_batch: usize,
    /// How often the drain looks at the queue; it is woken sooner when the queue
    /// is half full.
    pub interval: Duration,
}

/// A queue of `capacity` records, drained every [`FLUSH_INTERVAL`] in batches of at
/// most [`MAX_BATCH`] unless the [`Drain`]'s fields are changed.
pub fn queue(capacity: usize) -> (UsageQueue, Drain) {
    let (tx, rx) = mpsc::channel(capacity);
    let stats = Arc::new(QueueStats::default());
    (
        UsageQueue {
            tx,
            stats: stats.clone(),
        },
        Drain {
            rx,
            stats,
            max_batch: MAX_BATCH,
            interval: FLUSH_INTERVAL,
        },
    )
}

impl UsageQueue {
    /// Queues a record without waiting; returns false (and counts a drop) when full
    /// or closed.
    pub fn push(&self, record: UsageRecord) -> bool {
        match self.tx.try_send(record) {
            Ok(()) => {
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                if self.tx.capacity() < self.tx.max_capacity() / 2 {
                    self.stats.pressure.notify_one();
                }
                true
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                let now = crate::sync::now_ms();
                let last = self.stats.last_drop_warning_ms.load(Ordering::Relaxed);
                if now - last >= 1000
                    && self
                        .stats
                        .last_drop_warning_ms
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        dropped = self.stats.dropped.load(Ordering::Relaxed),
                        "usage queue full; events dropped"
                    );
                }
                false
            }
        }
    }

    /// Queues a record if there is room, else hands it back (not counted as a
    /// drop): for producers that can wait, such as benchmarks and replays.
    pub fn try_push(&self, record: UsageRecord) -> Result<(), UsageRecord> {
        match self.tx.try_send(record) {
            Ok(()) => {
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                if self.tx.capacity() < self.tx.max_capacity() / 2 {
                    self.stats.pressure.notify_one();
                }
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }
}

/// Default largest batch handed to the sink at once.
pub const MAX_BATCH: usize = 8192;

/// Default time between two looks of the drain at the queue.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

impl Drain {
    /// Moves records into `sink` until `stop` turns true, then closes the queue and
    /// writes everything still in it.
    pub async fn run(
        mut self,
        sink: Arc<dyn UsageSink>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while !*stop.borrow_and_update() {
            // Wake on a timer, not per event: a request never pays for waking this
            // task (a cross-thread wake-up is a syscall and a context switch).
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.stats.pressure.notified() => {}
                _ = stop.changed() => break,
            }
            while self.take(&mut batch) > 0 {
                self.write(&*sink, &mut batch, Some(&stop)).await;
            }
        }
        self.rx.close();
        while self.take(&mut batch) > 0 {
            self.write(&*sink, &mut batch, None).await;
        }
    }

    /// Moves up to `max_batch` waiting records into `batch` without waiting.
    fn take(&mut self, batch: &mut Vec<UsageRecord>) -> usize {
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        batch.len()
    }

    /// Offers `batch` until the sink takes it. While running (`stop` given) it
    /// retries for as long as it takes, unless shutdown starts; when closing, it
    /// gives up after five attempts.
    async fn write(
        &self,
        sink: &dyn UsageSink,
        batch: &mut Vec<UsageRecord>,
        stop: Option<&tokio::sync::watch::Receiver<bool>>,
    ) {
        let mut backoff = Duration::from_millis(50);
        let mut attempts = 0;
        let mut was_closing = false;
        loop {
            let closing = stop.is_none_or(|s| *s.borrow());
            if closing && !was_closing {
                // Shutdown gets its own five attempts.
                attempts = 0;
                backoff = Duration::from_millis(50);
                was_closing = true;
            }
            match sink.write(batch).await {
                Ok(()) => {
                    self.stats
                        .written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.stats.sink_failing.store(false, Ordering::Relaxed);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    attempts += 1;
                    self.stats.sink_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.sink_failing.store(true, Ordering::Relaxed);
                    tracing::warn!(error = %e, records = batch.len(), attempts, "usage sink refused a batch; retrying");
                    if closing && attempts >= 5 {
                        self.stats
                            .dropped
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        tracing::error!(
                            records = batch.len(),
                            "usage sink still failing at shutdown; batch dropped"
                        );
                        batch.clear();
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_config::usage::{TokenSource, UsageEvent, UsageStatus};
    use std::sync::Mutex;
    use uuid::Uuid;

    pub fn event(n: u64) -> UsageEvent {
        UsageEvent {
            event_id: Uuid::now_v7(),
            time_ms: 1,
            tenant: None,
            config: None,
            key_id: None,
            agent: None,
            route: "/api/agent-gateway/invoke/".into(),
            status: UsageStatus::Ok,
            http_status: 200,
            latency_us: 1,
            upstream_latency_us: None,
            bytes_in: 0,
            bytes_out: 0,
            input_tokens: Some(n),
            output_tokens: Some(1),
            token_source: TokenSource::Runtime,
        }
    }

    /// Fails its first `failures` writes, then records.
    struct Flaky {
        failures: AtomicU64,
        seen: Mutex<Vec<Uuid>>,
    }

    #[async_trait]
    impl UsageSink for Flaky {
        async fn write(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
            if self.failures.load(Ordering::Relaxed) > 0 {
                self.failures.fetch_sub(1, Ordering::Relaxed);
                anyhow::bail!("store down");
            }
            let mut seen = self.seen.lock().unwrap();
            for r in batch {
                if let UsageRecord::Event(e) = r {
                    seen.push(e.event_id);
                }
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn every_event_reaches_the_sink_in_order_despite_errors_and_shutdown() {
        let (q, drain) = queue(1024);
        let sink = Arc::new(Flaky {
            failures: AtomicU64::new(2),
            seen: Mutex::new(Vec::new()),
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(drain.run(sink.clone(), stop_rx));
        let mut ids = Vec::new();
        for n in 0..500 {
            let e = event(n);
            ids.push(e.event_id);
            assert!(q.push(UsageRecord::Event(Box::new(e))));
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(*sink.seen.lock().unwrap(), ids);
        assert_eq!(q.stats().written.load(Ordering::Relaxed), 500);
        assert_eq!(q.stats().sink_errors.load(Ordering::Relaxed), 2);
        assert!(!q.push(UsageRecord::Event(Box::new(event(0)))), "closed");
    }

    #[test]
    fn a_full_queue_counts_drops() {
        let (q, _drain) = queue(1);
        assert!(q.push(UsageRecord::Event(Box::new(event(1)))));
        assert!(!q.push(UsageRecord::Event(Box::new(event(2)))));
        assert_eq!(q.depth(), 1);
        assert_eq!(q.stats().dropped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn log_sink_counts() {
        let sink = LogSink::default();
        sink.write(&[
            UsageRecord::Event(Box::new(event(3))),
            UsageRecord::Report(TokenReport {
                request_id: Uuid::nil(),
                input_tokens: 2,
                output_tokens: 4,
            }),
        ])
        .await
        .unwrap();
        assert_eq!(sink.events.load(Ordering::Relaxed), 1);
        assert_eq!(sink.reports.load(Ordering::Relaxed), 1);
        assert_eq!(sink.input_tokens.load(Ordering::Relaxed), 5);
        assert_eq!(sink.output_tokens.load(Ordering::Relaxed), 5);
    }
}
