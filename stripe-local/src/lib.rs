//! A local stand-in for Stripe's HTTP API, for Agora's tests and the
//! `agora up` demo, served on a listener the caller has bound (loopback).
//!
//! It implements, with Stripe's wire rules (bearer or basic auth with the
//! secret key, form-encoded bodies with bracketed nesting, Stripe's error
//! shape, idempotency keys, `Request-Id`, list pagination, `expand[]`, unknown
//! parameters refused): customers, products, prices (licensed and metered),
//! billing meters, meter events (deduplicated by identifier) and their
//! summaries, checkout sessions in subscription mode with a hosted payment
//! page, subscriptions, invoices and their payment, payment methods, billing
//! portal sessions with a small hosted page, webhook endpoints, events, and
//! test clocks. Events are delivered as signed webhooks (`Stripe-Signature`),
//! at least once, retried with backoff. Every object has the same fields,
//! recursively, as Stripe's published example of it.
//!
//! Under `/_local/` (same key) tests can swap a customer's card, inject
//! faults, hold, duplicate and reorder webhook deliveries, and read back every
//! request, delivery and meter event received.
//!
//! It is a stand-in, not Stripe: no money moves and nothing leaves the
//! machine; one test-mode account; all state in memory; only the test cards
//! 4242 4242 4242 4242 (pays) and 4000 0000 0000 0341 (attaches, every charge
//! declined); no taxes, discounts, trials, prorations, one-time payments or
//! plan changes; and one clock for everything — real time plus whatever test
//! clocks have advanced it by (advancing any test clock moves it for all
//! customers; it never goes back). Only the events the flows above name are
//! emitted (no `customer.created`, `invoice.created` and the like).

// Stripe's larger objects are written out whole with `json!`.
#![recursion_limit = "256"]

mod billing;
mod delivery;
mod error;
mod form;
mod gate;
mod pages;
mod render;
mod routes;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::distributions::{Alphanumeric, DistString};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::State;

/// `prefix` and 32 base62 characters: a key or a signing secret.
fn random_secret(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
    )
}

/// How to start the stand-in. No `Debug`: it holds keys.
#[derive(Clone)]
pub struct Options {
    /// The only key accepted (default `sk_test_local_` and random characters).
    pub secret_key: String,
    pub publishable_key: String,
    /// Endpoints registered at start, each sent every event (`*`).
    pub webhooks: Vec<WebhookTarget>,
    /// Stamped on events (default `2025-03-31.basil`).
    pub api_version: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            secret_key: random_secret("sk_test_local_"),
            publishable_key: random_secret("pk_test_local_"),
            webhooks: Vec::new(),
            api_version: "2025-03-31.basil".into(),
        }
    }
}

/// Where to POST events, and the secret to sign them with.
#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub secret: String,
}

impl WebhookTarget {
    /// A target with a fresh `whsec_` secret.
    pub fn new(url: impl Into<String>) -> WebhookTarget {
        WebhookTarget {
            url: url.into(),
            secret: random_secret("whsec_"),
        }
    }
}

/// What every handler and delivery worker shares.
struct Shared {
    state: Mutex<State>,
    secret_key: String,
    http: reqwest::Client,
    /// Turns true when the stand-in stops; workers and retries end then.
    stop: watch::Receiver<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running stand-in. Dropping it stops the server and all deliveries.
pub struct LocalStripe {
    addr: SocketAddr,
    secret_key: String,
    publishable_key: String,
    webhook_secret: Option<String>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl LocalStripe {
    /// `http://127.0.0.1:PORT`: the API base and the hosted pages' host.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn publishable_key(&self) -> &str {
        &self.publishable_key
    }

    /// The signing secret of the first endpoint registered at start, if any.
    pub fn webhook_secret(&self) -> Option<&str> {
        self.webhook_secret.as_deref()
    }

    /// Stops taking requests, lets the ones under way finish, and ends deliveries.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Serves the stand-in on `listener` (kept, not rebound) from a spawned task.
pub async fn start(
    listener: tokio::net::TcpListener,
    options: Options,
) -> anyhow::Result<LocalStripe> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(options.api_version, format!("http://{addr}"))),
        secret_key: options.secret_key.clone(),
        http: reqwest::Client::builder().no_proxy().build()?,
        stop: stopped.clone(),
    });
    {
        let mut st = shared.lock();
        for target in &options.webhooks {
            delivery::add_endpoint(
                &shared,
                &mut st,
                target.url.clone(),
                target.secret.clone(),
                vec!["*".into()],
                None,
                Default::default(),
            );
        }
    }
    let app = routes::router(shared);
    let mut until = stopped;
    let server = tokio::spawn(async move {
        let stopping = async move {
            let _ = until.wait_for(|stop| *stop).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopping)
            .await
        {
            tracing::error!(error = %e, "stripe-local stopped serving");
        }
    });
    Ok(LocalStripe {
        addr,
        secret_key: options.secret_key,
        publishable_key: options.publishable_key,
        webhook_secret: options.webhooks.first().map(|w| w.secret.clone()),
        stop,
        server: Some(server),
    })
}
