//! Connection caps shared by both planes: at most so many open connections per
//! listener, and per client address, so that idle or slow clients cannot use up
//! the process's file descriptors and starve everyone else. A connection over a
//! cap is answered at once and closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Descriptors left for everything that is not a client connection (files,
/// the database pool, listeners).
const RESERVED_FDS: usize = 128;

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener has as many connections as it takes.
    Full,
    /// The client's address has as many connections as one address may.
    ClientFull,
}

impl Refusal {
    /// `listener` or `client`, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "listener",
            Refusal::ClientFull => "client",
        }
    }
}

/// Open connections, counted against the caps.
#[derive(Debug)]
pub struct ConnectionLimits {
    max: usize,
    per_client: usize,
    open: AtomicUsize,
    by_client: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionLimits {
    /// `max` connections in all (0: derived from the file-descriptor limit,
    /// each connection needing `fds_per_connection`) and `per_client` per
    /// client address (0: no per-address cap).
    pub fn new(max: usize, per_client: usize, fds_per_connection: usize) -> Arc<ConnectionLimits> {
        let max = if max == 0 {
            auto_max(fds_per_connection.max(1))
        } else {
            max
        };
        Arc::new(ConnectionLimits {
            max,
            per_client: if per_client == 0 {
                usize::MAX
            } else {
                per_client
            },
            open: AtomicUsize::new(0),
            by_client: Mutex::new(HashMap::new()),
        })
    }

    /// The cap on all connections.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a connection from `peer`, or says which cap it is over. The slot
    /// is given back when dropped.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Slot, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Full);
        }
        if let Some(ip) = peer {
            let mut by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
            let n = by_client.entry(ip).or_insert(0);
            if *n >= self.per_client {
                drop(by_client);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::ClientFull);
            }
            *n += 1;
        }
        Ok(Slot {
            limits: self.clone(),
            peer,
        })
    }
}

/// An admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    peer: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.peer {
            let mut by_client = self
                .limits
                .by_client
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = by_client.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_client.remove(&ip);
                }
            }
        }
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The process's soft limit on open files (Linux), if it can be read.
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn auto_max(fds_per_connection: usize) -> usize {
    match open_files_limit() {
        Some(limit) => (limit.saturating_sub(RESERVED_FDS) / fds_per_connection).max(16),
        None => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_dropped_slots_come_back() {
        let limits = ConnectionLimits::new(3, 2, 1);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = limits.admit(Some(a)).unwrap();
        let _a2 = limits.admit(Some(a)).unwrap();
        assert_eq!(limits.admit(Some(a)).err(), Some(Refusal::ClientFull));
        let _b1 = limits.admit(Some(b)).unwrap();
        assert_eq!(limits.admit(Some(b)).err(), Some(Refusal::Full));
        assert_eq!(limits.open(), 3);
        drop(a1);
        assert_eq!(limits.open(), 2);
        let _b2 = limits.admit(Some(b)).unwrap();
        assert_eq!(limits.admit(None).err(), Some(Refusal::Full));
    }

    #[test]
    fn the_automatic_cap_stays_below_the_descriptor_limit() {
        let limits = ConnectionLimits::new(0, 0, 2);
        if let Some(fds) = open_files_limit() {
            assert!(
                limits.max() * 2 <= fds.max(160),
                "{} of {fds}",
                limits.max()
            );
        }
        assert!(limits.max() >= 16);
    }
}
