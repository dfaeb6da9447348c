//! Webhook delivery: one worker per endpoint makes each event's first attempt
//! in creation order (an attempt gives up after 5 s, so a stuck receiver
//! cannot hold the rest for ever); an event that fails is retried on its own
//! task with backoff (100 ms doubling, capped at 5 s, 12 attempts in all), so
//! it blocks nothing. At-least-once: receivers must remove duplicates by event id.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::watch;

use crate::state::{real_now, Endpoint, Metadata, State};
use crate::Shared;

const ATTEMPTS: u32 = 12;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Job {
    pub event_id: String,
    pub kind: String,
    pub body: Arc<str>,
    pub delay_ms: u64,
}

/// How events reach endpoints, as set through `/_local/delivery`.
#[derive(Clone, Copy, Default, Deserialize, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Normal,
    /// Each event is delivered twice.
    Duplicate,
    /// Events wait until a flush.
    Hold,
}

#[derive(Clone, Copy, Default, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct DeliveryMode {
    pub mode: Mode,
    #[serde(default)]
    pub delay_ms: u64,
}

/// The order a flush sends the held deliveries in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushOrder {
    AsMade,
    Reverse,
    /// Shuffled by a generator seeded with `seed`: the same seed, the same order.
    Shuffle {
        seed: u64,
    },
    /// Index `k` of the list is the position, in the held queue as made, of
    /// the `k`-th delivery to send; each held delivery must be named once.
    Explicit(Vec<usize>),
}

/// A flush in an explicit order whose indices do not name each held
/// delivery exactly once.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid indices: must name each of the {held} held deliveries once, by its index (0 to {held} exclusive) in the order they were made.")]
pub struct NotAPermutation {
    pub held: usize,
}

/// Checks that `indices` names each of `0..len` exactly once.
fn check_permutation(indices: &[usize], len: usize) -> Result<(), NotAPermutation> {
    let mut seen = vec![false; len];
    let each_once = indices.len() == len
        && indices
            .iter()
            .all(|&i| i < len && !std::mem::replace(&mut seen[i], true));
    each_once.then_some(()).ok_or(NotAPermutation { held: len })
}

/// `Stripe-Signature` for `body` sent at unix time `t`.
pub fn signature(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl State {
    pub fn deliver(&mut self, endpoint: usize, job: Job) {
        match self.delivery.mode {
            Mode::Hold => self.held.push((endpoint, job)),
            Mode::Duplicate => {
                let _ = self.endpoints[endpoint].queue.send(job.clone());
                let _ = self.endpoints[endpoint].queue.send(job);
            }
            Mode::Normal => {
                let _ = self.endpoints[endpoint].queue.send(job);
            }
        }
    }

    /// Sends what was held, in `order`; returns how many deliveries that was.
    /// An explicit order that is not a permutation of the held queue is
    /// refused, and then nothing is sent and everything stays held.
    pub fn flush(&mut self, order: FlushOrder) -> Result<usize, NotAPermutation> {
        if let FlushOrder::Explicit(indices) = &order {
            check_permutation(indices, self.held.len())?;
        }
        let mut held = std::mem::take(&mut self.held);
        match order {
            FlushOrder::AsMade => {}
            FlushOrder::Reverse => held.reverse(),
            FlushOrder::Shuffle { seed } => {
                held.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed))
            }
            FlushOrder::Explicit(indices) => {
                let mut slots: Vec<_> = held.into_iter().map(Some).collect();
                held = indices
                    .iter()
                    .map(|&i| slots[i].take().expect("a permutation names each once"))
                    .collect();
            }
        }
        let count = held.len();
        for (endpoint, job) in held {
            let _ = self.endpoints[endpoint].queue.send(job);
        }
        Ok(count)
    }
}

/// Registers an endpoint and starts its worker.
pub fn add_endpoint(
    shared: &Arc<Shared>,
    state: &mut State,
    url: String,
    secret: String,
    enabled_events: Vec<String>,
    api_version: Option<String>,
    metadata: Metadata,
) -> usize {
    let (queue, jobs) = unbounded_channel();
    let target = Target {
        url: url.clone(),
        secret,
    };
    tokio::spawn(worker(shared.clone(), target, jobs));
    state.endpoints.push(Endpoint {
        id: crate::state::new_id("we"),
        created: state.now(),
        url,
        enabled_events,
        api_version,
        metadata,
        queue,
    });
    state.endpoints.len() - 1
}

#[derive(Clone)]
struct Target {
    url: String,
    secret: String,
}

async fn worker(shared: Arc<Shared>, target: Target, mut jobs: UnboundedReceiver<Job>) {
    let mut stop = shared.stop.clone();
    loop {
        let job = tokio::select! {
            job = jobs.recv() => match job { Some(job) => job, None => return },
            _ = stop.changed() => return,
        };
        if job.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(job.delay_ms)).await;
        }
        if !attempt(&shared, &target, &job, 1).await {
            tokio::spawn(retry(
                shared.clone(),
                target.clone(),
                job,
                shared.stop.clone(),
            ));
        }
    }
}

async fn retry(shared: Arc<Shared>, target: Target, job: Job, mut stop: watch::Receiver<bool>) {
    let attempts = async {
        let mut backoff = Duration::from_millis(100);
        for n in 2..=ATTEMPTS {
            tokio::time::sleep(backoff).await;
            if attempt(&shared, &target, &job, n).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    tokio::select! {
        _ = attempts => {},
        _ = stop.changed() => {},
    }
}

/// One signed POST; records it and says whether the receiver took it (2xx).
async fn attempt(shared: &Shared, target: &Target, job: &Job, n: u32) -> bool {
    let sent = shared
        .http
        .post(&target.url)
        .timeout(ATTEMPT_TIMEOUT)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .header(
            "stripe-signature",
            signature(&target.secret, real_now(), &job.body),
        )
        .body(job.body.to_string())
        .send()
        .await;
    let status = match &sent {
        Ok(response) => response.status().as_u16(),
        Err(e) => {
            tracing::debug!(url = %target.url, error = %e, "webhook delivery failed to connect");
            0
        }
    };
    shared.lock().deliveries.push(json!({
        "event_id": job.event_id,
        "type": job.kind,
        "url": target.url,
        "status": status,
        "attempt": n,
    }));
    (200..300).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body_in_hex() {
        // Computed apart, with Python's hmac module.
        assert_eq!(
            signature("whsec_test", 1_700_000_000, r#"{"id":"evt_1"}"#),
            "t=1700000000,v1=c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925"
        );
    }

    #[test]
    fn an_explicit_flush_order_must_name_each_held_delivery_once() {
        assert_eq!(check_permutation(&[2, 0, 1, 3], 4), Ok(()));
        assert_eq!(check_permutation(&[], 0), Ok(()));
        for bad in [&[0, 0, 1][..], &[0, 1], &[0, 1, 2, 3], &[0, 1, 3], &[]] {
            assert_eq!(
                check_permutation(bad, 3),
                Err(NotAPermutation { held: 3 }),
                "{bad:?}"
            );
        }
    }

    /// A state holding deliveries `e0`, `e1`, … for one endpoint, and that
    /// endpoint's queue.
    fn holding(n: usize) -> (State, UnboundedReceiver<Job>) {
        let (queue, sent) = unbounded_channel();
        let mut state = State::default();
        state.endpoints.push(Endpoint {
            id: "we_1".into(),
            created: 0,
            url: "http://127.0.0.1:9/hook".into(),
            enabled_events: vec!["*".into()],
            api_version: None,
            metadata: Metadata::new(),
            queue,
        });
        state.delivery.mode = Mode::Hold;
        for i in 0..n {
            let job = Job {
                event_id: format!("e{i}"),
                kind: "invoice.paid".into(),
                body: Arc::from("{}"),
                delay_ms: 0,
            };
            state.deliver(0, job);
        }
        (state, sent)
    }

    fn sent_ids(sent: &mut UnboundedReceiver<Job>) -> Vec<String> {
        std::iter::from_fn(|| sent.try_recv().ok())
            .map(|job| job.event_id)
            .collect()
    }

    #[test]
    fn an_explicit_flush_sends_the_held_deliveries_in_the_order_of_its_indices() {
        let (mut state, mut sent) = holding(4);
        assert_eq!(state.flush(FlushOrder::Explicit(vec![2, 0, 1, 3])), Ok(4));
        assert_eq!(sent_ids(&mut sent), ["e2", "e0", "e1", "e3"]);
        assert!(state.held.is_empty());
    }

    #[test]
    fn a_refused_explicit_flush_sends_nothing_and_keeps_everything_held() {
        let (mut state, mut sent) = holding(3);
        assert_eq!(
            state.flush(FlushOrder::Explicit(vec![0, 0, 1])),
            Err(NotAPermutation { held: 3 })
        );
        assert!(sent_ids(&mut sent).is_empty());
        assert_eq!(state.flush(FlushOrder::AsMade), Ok(3));
        assert_eq!(sent_ids(&mut sent), ["e0", "e1", "e2"]);
    }

    #[test]
    fn the_delivery_mode_reads_strictly() {
        let mode: DeliveryMode = serde_json::from_str(r#"{"mode":"hold"}"#).unwrap();
        assert_eq!((mode.mode, mode.delay_ms), (Mode::Hold, 0));
        assert!(serde_json::from_str::<DeliveryMode>(r#"{"mode":"reverse"}"#).is_err());
        assert!(serde_json::from_str::<DeliveryMode>(r#"{"mode":"normal","dely_ms":1}"#).is_err());
    }
}
