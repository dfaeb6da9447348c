//! From the proxy's drain to the store: every batch is appended to the spill log
//! (the drain's only wait is that local write), and a shipper sends the log's
//! frames, oldest first, to the store. While the store is away the log grows up to
//! its bound; what happens then is [`SpillFullPolicy`]. On shutdown the shipper gets
//! a deadline to empty the log; what it cannot ship stays on disk for the next start.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_config::settings::{Settings, SpillFullPolicy};
use agora_config::usage::UsageRecord;
use anyhow::Context as _;
use async_trait::async_trait;
use tokio::sync::{watch, Notify};

use crate::spill::{self, AppendError, Pending, SpillLog};
use crate::{UsageSink, UsageStore};

/// Most bytes of the log read for one shipment.
const SHIP_READ_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub spill_path: PathBuf,
    pub spill_max_bytes: u64,
    /// `None`: fsync after every batch.
    pub fsync_every: Option<Duration>,
    pub when_full: SpillFullPolicy,
    /// Most records in one insert.
    pub batch_max_events: usize,
    /// How often the shipper looks at the log when nothing wakes it.
    pub ship_interval: Duration,
}

impl PipelineConfig {
    pub fn from_settings(settings: &Settings) -> PipelineConfig {
        let u = &settings.usage;
        PipelineConfig {
            spill_path: settings.usage_spill_path(),
            spill_max_bytes: u.spill_max_bytes,
            fsync_every: (u.spill_fsync_ms > 0).then(|| Duration::from_millis(u.spill_fsync_ms)),
            when_full: u.spill_full,
            batch_max_events: u.batch_max_events,
            ship_interval: Duration::from_millis(u.batch_max_ms),
        }
    }
}

/// What the pipeline has done, for metrics and health.
#[derive(Default, Debug)]
pub struct PipelineStats {
    /// Records appended to the spill log.
    pub logged: AtomicU64,
    /// Records the store took.
    pub shipped: AtomicU64,
    pub store_errors: AtomicU64,
    pub store_failing: AtomicBool,
    /// Bytes in the log not yet in the store.
    pub spill_bytes: AtomicU64,
    pub spill_full: AtomicBool,
    /// Set while appends to the log fail (a disk error, a full disk).
    pub log_failing: AtomicBool,
    /// Records dropped because the log was full (policy `serve_unmetered`).
    pub dropped: AtomicU64,
    /// Bytes found damaged in the log when it was opened.
    pub damaged_bytes: AtomicU64,
}

pub struct Pipeline {
    log: Arc<Mutex<SpillLog>>,
    store: Arc<dyn UsageStore>,
    stats: Arc<PipelineStats>,
    wake: Notify,
    config: PipelineConfig,
    spill_max_bytes: u64,
}

impl Pipeline {
    /// Opens the spill log (recovering what a previous run left in it).
    pub fn open(config: PipelineConfig, store: Arc<dyn UsageStore>) -> anyhow::Result<Pipeline> {
        let (log, recovery) = SpillLog::open(
            &config.spill_path,
            config.spill_max_bytes,
            config.fsync_every,
        )
        .with_context(|| format!("opening the spill log {}", config.spill_path.display()))?;
        let stats = Arc::new(PipelineStats::default());
        if recovery.damaged_bytes > 0 {
            tracing::error!(
                damaged_bytes = recovery.damaged_bytes,
                moved_to = %recovery.damaged_copy.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                recovered_batches = recovery.pending_batches,
                "the usage spill log was damaged; recovered up to the damage"
            );
        }
        if recovery.pending_batches > 0 {
            tracing::info!(
                batches = recovery.pending_batches,
                bytes = recovery.pending_bytes,
                "usage batches from an earlier run will be shipped"
            );
        }
        stats
            .damaged_bytes
            .store(recovery.damaged_bytes, Ordering::Relaxed);
        stats
            .spill_bytes
            .store(recovery.pending_bytes, Ordering::Relaxed);
        Ok(Pipeline {
            spill_max_bytes: log.max_bytes(),
            log: Arc::new(Mutex::new(log)),
            store,
            stats,
            wake: Notify::new(),
            config,
        })
    }

    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

    pub fn store(&self) -> &Arc<dyn UsageStore> {
        &self.store
    }

    pub fn spill_max_bytes(&self) -> u64 {
        self.spill_max_bytes
    }

    /// True while new invokes must be refused: the log is full and the policy
    /// says no unmetered traffic.
    /// Refusal starts at 90% of the bound, so requests already running and the
    /// runtime's reports still find room.
    pub fn refusing(&self) -> bool {
        self.config.when_full == SpillFullPolicy::Refuse
            && (self.stats.spill_full.load(Ordering::Relaxed)
                || self.stats.log_failing.load(Ordering::Relaxed)
                || self.stats.spill_bytes.load(Ordering::Relaxed) >= self.spill_max_bytes / 10 * 9)
    }

    /// From now on the log takes batches past its bound: shutdown's last batches
    /// are kept rather than lost.
    pub fn allow_overflow(&self) {
        self.lock().allow_overflow();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpillLog> {
        // A panic while holding the lock leaves the log consistent (every write is
        // checked before `len` moves), so a poisoned lock is still usable.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ships the log to the store until it is empty, `stop` turns true, or the
    /// store fails (then retries with backoff). After `stop`, keeps trying for
    /// `grace`, then returns; what is left stays in the log.
    pub async fn run_shipper(self: Arc<Self>, mut stop: watch::Receiver<bool>, grace: Duration) {
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow_and_update() {
            match self.ship_all().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    self.note_failure(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.ship_interval) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => break,
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match self.ship_all().await {
                Ok(()) => break,
                Err(e) => {
                    self.note_failure(&e);
                    if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                        tracing::warn!(
                            pending_bytes = self.stats.spill_bytes.load(Ordering::Relaxed),
                            "usage store unreachable at shutdown; the spill log keeps the rest for the next start"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if let Err(e) = self.lock().sync() {
            tracing::error!(error = %e, "syncing the usage spill log at shutdown");
        }
    }

    fn note_failure(&self, e: &anyhow::Error) {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        if !self.stats.store_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %format!("{e:#}"), store = self.store.kind(), "usage store refused a batch; spilling to disk until it returns");
        }
    }

    /// Ships everything logged so far.
    pub async fn ship_all(&self) -> anyhow::Result<()> {
        loop {
            let pending = {
                let log = self.lock();
                if log.pending_bytes() == 0 {
                    return Ok(());
                }
                log.pending()?
            };
            let frames = read(pending).await?;
            // One insert per group of frames up to the batch size.
            let mut group: Vec<UsageRecord> = Vec::new();
            let mut frames = frames.into_iter().peekable();
            while let Some((end, batch)) = frames.next() {
                group.extend(batch);
                let next_fits = frames
                    .peek()
                    .is_some_and(|(_, b)| group.len() + b.len() <= self.config.batch_max_events);
                if !next_fits {
                    let records = group.len() as u64;
                    self.store.insert_owned(std::mem::take(&mut group)).await?;
                    self.stats.shipped.fetch_add(records, Ordering::Relaxed);
                    let mut log = self.lock();
                    log.mark_shipped(end)?;
                    self.stats
                        .spill_bytes
                        .store(log.pending_bytes(), Ordering::Relaxed);
                    if self.stats.store_failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            store = self.store.kind(),
                            "usage store is back; spilled batches shipped"
                        );
                    }
                }
            }
        }
    }
}

/// One batch as the spill log frames it (for benchmarks of the frame's cost).
pub fn encode_frame(batch: &[UsageRecord]) -> postcard::Result<Vec<u8>> {
    spill::encode(batch)
}

/// A frame back to its batch, `None` when damaged (for benchmarks).
pub fn decode_frame(frame: &[u8]) -> Option<Vec<UsageRecord>> {
    spill::decode(frame)
}

async fn read(pending: Pending) -> anyhow::Result<Vec<(u64, Vec<UsageRecord>)>> {
    tokio::task::spawn_blocking(move || pending.read(SHIP_READ_BYTES))
        .await
        .context("reading the spill log")?
        .context("reading the spill log")
}

#[async_trait]
impl UsageSink for Pipeline {
    /// Appends the batch to the spill log. Fails only when the log cannot take it
    /// (disk error, or full under the `refuse` policy); the drain then keeps the
    /// batch and retries.
    async fn write(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
        let frame = spill::encode(batch).context("encoding a usage batch")?;
        let log = self.log.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            let result = log.append(&frame);
            (result, log.pending_bytes())
        })
        .await
        .context("writing the spill log")?;
        let (result, pending) = result;
        self.stats.spill_bytes.store(pending, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.stats.log_failing.store(false, Ordering::Relaxed);
                self.stats
                    .logged
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if self.stats.spill_full.swap(false, Ordering::Relaxed) {
                    tracing::info!("the usage spill log has room again");
                }
                self.wake.notify_one();
                Ok(())
            }
            Err(AppendError::Full { len, max }) => {
                if !self.stats.spill_full.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        len,
                        max,
                        policy = ?self.config.when_full,
                        "the usage spill log is full"
                    );
                }
                match self.config.when_full {
                    SpillFullPolicy::Refuse => {
                        anyhow::bail!("the usage spill log is full ({len} of {max} bytes)")
                    }
                    SpillFullPolicy::ServeUnmetered => {
                        self.stats
                            .dropped
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        Ok(())
                    }
                }
            }
            Err(AppendError::Io(e)) => {
                if !self.stats.log_failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "appending to the usage spill log failed");
                }
                Err(e).context("appending to the spill log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::event;
    use crate::{Aggregate, Scope, TimeRange};
    use uuid::Uuid;

    /// Takes batches into memory; fails while `down` is set.
    #[derive(Default)]
    struct Memory {
        down: AtomicBool,
        rows: Mutex<Vec<UsageRecord>>,
    }

    #[async_trait]
    impl UsageStore for Memory {
        async fn insert(&self, batch: &[UsageRecord]) -> anyhow::Result<()> {
            anyhow::ensure!(!self.down.load(Ordering::Relaxed), "store down");
            self.rows.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
        async fn aggregate(
            &self,
            _: Scope,
            _: TimeRange,
            _: i64,
        ) -> anyhow::Result<Vec<Aggregate>> {
            Ok(Vec::new())
        }
        async fn last_failure(
            &self,
            _: Uuid,
        ) -> anyhow::Result<Option<agora_config::usage::RunFailure>> {
            Ok(None)
        }
        async fn ping(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn kind(&self) -> &'static str {
            "memory"
        }
    }

    fn config(dir: &std::path::Path, max: u64, when_full: SpillFullPolicy) -> PipelineConfig {
        PipelineConfig {
            spill_path: dir.join("spill.log"),
            spill_max_bytes: max,
            fsync_every: None,
            when_full,
            batch_max_events: 7,
            ship_interval: Duration::from_millis(10),
        }
    }

    fn batch(n: usize) -> Vec<UsageRecord> {
        (0..n)
            .map(|i| UsageRecord::Event(Box::new(event(Uuid::from_u128(1), i as i64, 1, None))))
            .collect()
    }

    fn ids(records: &[UsageRecord]) -> Vec<Uuid> {
        records.iter().map(UsageRecord::event_id).collect()
    }

    #[tokio::test]
    async fn an_outage_is_spilled_and_replayed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Memory::default());
        store.down.store(true, Ordering::Relaxed);
        let pipeline = Arc::new(
            Pipeline::open(
                config(dir.path(), 1 << 30, SpillFullPolicy::Refuse),
                store.clone(),
            )
            .unwrap(),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let shipper = tokio::spawn(
            pipeline
                .clone()
                .run_shipper(stop_rx, Duration::from_secs(5)),
        );
        let mut sent = Vec::new();
        for n in [3, 5, 4] {
            let b = batch(n);
            sent.extend(ids(&b));
            pipeline.write(&b).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(store.rows.lock().unwrap().is_empty());
        assert!(pipeline.stats().store_failing.load(Ordering::Relaxed));
        assert!(pipeline.stats().spill_bytes.load(Ordering::Relaxed) > 0);

        store.down.store(false, Ordering::Relaxed);
        stop_tx.send(true).unwrap();
        shipper.await.unwrap();
        assert_eq!(ids(&store.rows.lock().unwrap()), sent);
        assert_eq!(pipeline.stats().shipped.load(Ordering::Relaxed), 12);
        assert_eq!(pipeline.stats().spill_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(
            std::fs::metadata(dir.path().join("spill.log"))
                .unwrap()
                .len(),
            0
        );
    }

    #[tokio::test]
    async fn what_a_stopped_pipeline_could_not_ship_is_shipped_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(Memory::default());
        down.down.store(true, Ordering::Relaxed);
        let first = Arc::new(
            Pipeline::open(config(dir.path(), 1 << 30, SpillFullPolicy::Refuse), down).unwrap(),
        );
        let b = batch(9);
        first.write(&b).await.unwrap();
        let (_tx, rx) = watch::channel(true);
        first
            .clone()
            .run_shipper(rx, Duration::from_millis(300))
            .await;
        drop(first);

        let store = Arc::new(Memory::default());
        let second = Pipeline::open(
            config(dir.path(), 1 << 30, SpillFullPolicy::Refuse),
            store.clone(),
        )
        .unwrap();
        second.ship_all().await.unwrap();
        assert_eq!(ids(&store.rows.lock().unwrap()), ids(&b));
    }

    #[tokio::test]
    async fn a_full_log_refuses_or_drops_by_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Memory::default());
        store.down.store(true, Ordering::Relaxed);
        let frame_len = spill::encode(&batch(50)).unwrap().len() as u64;
        for policy in [SpillFullPolicy::Refuse, SpillFullPolicy::ServeUnmetered] {
            let sub = dir.path().join(format!("{policy:?}"));
            let p = Pipeline::open(config(&sub, frame_len * 2, policy), store.clone()).unwrap();
            p.write(&batch(50)).await.unwrap();
            assert!(!p.refusing());
            p.write(&batch(50)).await.unwrap();
            // Past 90% of the bound, the refuse policy turns invokes away already.
            assert_eq!(p.refusing(), policy == SpillFullPolicy::Refuse);
            let third = p.write(&batch(50)).await;
            assert!(p.stats().spill_full.load(Ordering::Relaxed));
            match policy {
                SpillFullPolicy::Refuse => {
                    assert!(third.is_err());
                    assert!(p.refusing());
                    // The store returns: shipping frees the log and appends resume.
                    store.down.store(false, Ordering::Relaxed);
                    p.ship_all().await.unwrap();
                    p.write(&batch(50)).await.unwrap();
                    assert!(!p.refusing());
                    store.down.store(true, Ordering::Relaxed);
                }
                SpillFullPolicy::ServeUnmetered => {
                    assert!(third.is_ok());
                    assert!(!p.refusing());
                    assert_eq!(p.stats().dropped.load(Ordering::Relaxed), 50);
                }
            }
        }
    }
}
