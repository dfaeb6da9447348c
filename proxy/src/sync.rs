//! Keeps the proxy's configuration current: reads the control plane's snapshot feed,
//! applies deltas, and persists every applied snapshot to disk.
//!
//! # Static stability
//!
//! At start the proxy loads the snapshot it last saved and serves from it at once;
//! the control plane being down delays nothing and refuses nothing that the saved
//! snapshot allows. The poller then fetches the current snapshot and long-polls
//! `GET /internal/v1/changes?since=REV`. When the control plane is unreachable the
//! proxy keeps serving its last snapshot and retries with a capped backoff; it
//! catches up with one delta (or one full snapshot) when the control plane returns.
//! Health reports how long ago the configuration was last confirmed current.
//!
//! The file is written to a temporary name, synced and renamed over the old one, so a
//! crash leaves either the old or the new snapshot, never a torn one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agora_config::snapshot::{Changes, Snapshot};
use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};

use crate::state::{PeerTimeouts, State};

/// The current configuration and what is known about its freshness.
pub struct Shared {
    state: ArcSwap<State>,
    /// Unix ms when the control plane last confirmed the revision (or when the
    /// loaded file was written); 0 when there is no snapshot at all.
    confirmed_at_ms: AtomicI64,
    /// Whether any snapshot (from disk or the control plane) has been applied.
    loaded: AtomicBool,
    /// Whether the control plane answered the last request.
    connected: AtomicBool,
    timeouts: PeerTimeouts,
}

impl Shared {
    pub fn new(timeouts: PeerTimeouts) -> Shared {
        Shared {
            state: ArcSwap::from_pointee(State::empty()),
            confirmed_at_ms: AtomicI64::new(0),
            loaded: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            timeouts,
        }
    }

    /// The configuration a request uses from start to end.
    pub fn load(&self) -> arc_swap::Guard<Arc<State>> {
        self.state.load()
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Seconds since the configuration was last confirmed current, if there is one.
    pub fn age_secs(&self, now_ms: i64) -> Option<f64> {
        if !self.is_loaded() {
            return None;
        }
        let at = self.confirmed_at_ms.load(Ordering::Relaxed);
        Some(((now_ms - at).max(0) as f64) / 1000.0)
    }

    /// Swaps in a new snapshot.
    pub fn install(&self, snapshot: Snapshot, confirmed_at_ms: i64) {
        let previous = self.state.load_full();
        let state = State::build(snapshot, &previous, self.timeouts);
        self.state.store(Arc::new(state));
        self.confirmed_at_ms
            .store(confirmed_at_ms, Ordering::Relaxed);
        self.loaded.store(true, Ordering::Release);
    }

    fn confirm(&self, at_ms: i64) {
        self.confirmed_at_ms.store(at_ms, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }
}

/// Where and how to read the feed.
pub struct FeedConfig {
    pub control_plane_url: String,
    pub proxy_secret: Option<SecretString>,
    pub snapshot_path: PathBuf,
    pub long_poll: Duration,
}

/// Loads the saved snapshot, if any, into `shared`. A missing file is normal on a
/// first start; an unreadable or corrupt one is reported and ignored.
pub fn load_saved(shared: &Shared, path: &Path) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved snapshot");
            return;
        }
    };
    match serde_json::from_slice::<Snapshot>(&bytes) {
        Ok(snapshot) => {
            let written_ms = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or(snapshot.generated_at_ms);
            tracing::info!(revision = snapshot.revision, path = %path.display(), "serving from the saved snapshot");
            shared.install(snapshot, written_ms);
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the saved snapshot is not valid; waiting for the control plane");
        }
    }
}

/// Writes `snapshot` to `path` atomically (temporary file, fsync, rename).
pub fn save(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(snapshot).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Follows the feed until `stop` turns true.
pub async fn follow(
    shared: Arc<Shared>,
    config: FeedConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(config.long_poll + Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the feed client");
            return;
        }
    };
    let mut backoff = Duration::from_millis(100);
    let mut have_current = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let result = tokio::select! {
            r = poll_once(&client, &shared, &config, have_current) => r,
            _ = stop.changed() => return,
        };
        match result {
            Ok(()) => {
                have_current = true;
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                if shared.connected.swap(false, Ordering::Relaxed) || backoff.as_secs() >= 5 {
                    tracing::warn!(error = %e, "control plane unreachable; serving the last snapshot");
                }
                have_current = false;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn poll_once(
    client: &reqwest::Client,
    shared: &Shared,
    config: &FeedConfig,
    have_current: bool,
) -> anyhow::Result<()> {
    let base = &config.control_plane_url;
    // An owned handle: it is held across the long poll.
    let current = shared.state.load_full();
    // Before the first answer (or after an outage) ask without waiting: the answer
    // brings us up to date at once; then long-poll.
    let wait_ms = if have_current && shared.is_loaded() {
        config.long_poll.as_millis()
    } else {
        0
    };
    let url = format!(
        "{base}/internal/v1/changes?since={}&timeout_ms={wait_ms}",
        current.revision()
    );
    let mut request = client.get(&url);
    if let Some(secret) = &config.proxy_secret {
        request = request.bearer_auth(secret.expose_secret());
    }
    let response = request.send().await?;
    if !response.status().is_success() {
        anyhow::bail!("control plane answered {}", response.status());
    }
    let changes: Changes = response.json().await?;
    let now = now_ms();
    let snapshot = match changes {
        Changes::Unchanged { .. } => {
            shared.confirm(now);
            return Ok(());
        }
        Changes::Full { snapshot } => snapshot,
        Changes::Delta { delta } => {
            let mut next = current.snapshot().clone();
            if let Err(e) = next.apply(&delta) {
                tracing::info!(error = %e, "delta does not apply; fetching the full snapshot");
                fetch_full(client, config).await?
            } else {
                next
            }
        }
    };
    drop(current);
    let revision = snapshot.revision;
    let path = config.snapshot_path.clone();
    let to_save = snapshot.clone();
    shared.install(snapshot, now);
    shared.confirm(now);
    tracing::debug!(revision, "applied snapshot");
    let saved = tokio::task::spawn_blocking(move || save(&path, &to_save)).await;
    if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
        tracing::warn!(error = %e, "cannot save the snapshot; a restart without the control plane would serve an older one");
    }
    Ok(())
}

async fn fetch_full(client: &reqwest::Client, config: &FeedConfig) -> anyhow::Result<Snapshot> {
    let mut request = client.get(format!("{}/internal/v1/snapshot", config.control_plane_url));
    if let Some(secret) = &config.proxy_secret {
        request = request.bearer_auth(secret.expose_secret());
    }
    let response = request.send().await?;
    if !response.status().is_success() {
        anyhow::bail!("control plane answered {}", response.status());
    }
    Ok(response.json().await?)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_snapshots_load_and_corrupt_ones_are_ignored() {
        let dir = std::env::temp_dir().join(format!("agora-sync-{}", uuid::Uuid::new_v4()));
        let path = dir.join("snap.json");
        let timeouts = PeerTimeouts {
            connect: Duration::from_secs(1),
            read: Duration::from_secs(1),
        };
        let shared = Shared::new(timeouts);
        load_saved(&shared, &path);
        assert!(!shared.is_loaded(), "no file, nothing loaded");

        let mut snapshot = Snapshot::empty();
        snapshot.revision = 7;
        save(&path, &snapshot).unwrap();
        load_saved(&shared, &path);
        assert!(shared.is_loaded());
        assert_eq!(shared.load().revision(), 7);
        assert!(shared.age_secs(now_ms()).unwrap() < 60.0);

        std::fs::write(&path, b"{\"revision\": 9, \"trunc").unwrap();
        let fresh = Shared::new(timeouts);
        load_saved(&fresh, &path);
        assert!(!fresh.is_loaded(), "a corrupt file is not served");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
