//! Admission: rate limits, in-flight limits and plan quotas.
//!
//! - **Per key**: GCRA (governor) at the plan's `requests_per_minute` with its `burst`
//!   (default: the per-minute rate). One keyed limiter per distinct (rate, burst),
//!   keyed by key id, so keys on different plans never share a bucket.
//! - **Per tenant**: GCRA at the proxy's `tenant_requests_per_second`/`tenant_burst`,
//!   over all of a tenant's keys.
//! - **In flight per key**: the plan's `max_concurrency`, held by an [`InFlight`] guard
//!   that releases on drop, whatever way the request ends.
//! - **Quota**: the plan's `request_quota`/`token_quota` for the period, from the
//!   snapshot's count ([`QuotaUsage`]) plus what this proxy served since that count.
//!
//! Memory is bounded: only keys that passed the key check reach a limiter, so state
//! exists only for keys in the snapshot; [`Limits::prune`] (run periodically) drops
//! buckets that are full again, idle in-flight counters, and quota counters of
//! configs no longer in the snapshot.
//!
//! The limiter takes its clock, so tests drive it with governor's `FakeRelativeClock`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use agora_config::snapshot::{KeyEntry, PlanLimits, QuotaUsage};
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DashMapStateStore;
use governor::{NotUntil, Quota, RateLimiter};
use uuid::Uuid;

use crate::error::{GatewayError, RateHeaders, RateLimit};

type Keyed<C> = RateLimiter<Uuid, DashMapStateStore<Uuid>, C, StateInformationMiddleware>;

pub struct Limits<C: Clock = DefaultClock> {
    clock: C,
    per_plan: DashMap<(u32, u32), Arc<Keyed<C>>>,
    tenants: Keyed<C>,
    in_flight: DashMap<Uuid, Arc<AtomicU32>>,
    quotas: DashMap<Uuid, Arc<QuotaCounter>>,
    /// Widget visitors' messages, by visitor id.
    visitors: Keyed<C>,
    /// Widget visitor sessions opened, by client address.
    addresses: RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, StateInformationMiddleware>,
}

/// What this proxy served for a config since the snapshot's count, and (with
/// limits shared through Redis) what the other gateways served since it.
pub struct QuotaCounter {
    counted_at_ms: i64,
    requests: AtomicU64,
    tokens: AtomicU64,
    /// Of `requests`/`tokens`, what has been added to the shared count.
    sent_requests: AtomicU64,
    sent_tokens: AtomicU64,
    /// The shared count less this gateway's part, as last read.
    others_requests: AtomicU64,
    others_tokens: AtomicU64,
}

impl QuotaCounter {
    fn since(counted_at_ms: i64) -> Arc<QuotaCounter> {
        Arc::new(QuotaCounter {
            counted_at_ms,
            requests: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            sent_requests: AtomicU64::new(0),
            sent_tokens: AtomicU64::new(0),
            others_requests: AtomicU64::new(0),
            others_tokens: AtomicU64::new(0),
        })
    }

    /// The control plane's count this counter runs from.
    pub fn counted_at_ms(&self) -> i64 {
        self.counted_at_ms
    }

    /// Requests and tokens served here since the count.
    pub fn served(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.tokens.load(Ordering::Relaxed),
        )
    }

    /// Whether this gateway served more than the shared count last heard.
    pub fn unreported(&self) -> bool {
        let (r, t) = self.served();
        r != self.sent_requests.load(Ordering::Relaxed)
            || t != self.sent_tokens.load(Ordering::Relaxed)
    }

    /// The shared count heard this gateway's totals `requests`/`tokens`, and
    /// holds `total_requests`/`total_tokens` over all gateways.
    pub fn reported(&self, requests: u64, tokens: u64, total_requests: u64, total_tokens: u64) {
        self.sent_requests.store(requests, Ordering::Relaxed);
        self.sent_tokens.store(tokens, Ordering::Relaxed);
        self.others_requests
            .store(total_requests.saturating_sub(requests), Ordering::Relaxed);
        self.others_tokens
            .store(total_tokens.saturating_sub(tokens), Ordering::Relaxed);
    }
}

/// The value under `key`, inserted by `make` when missing. The common case (it
/// exists) takes only a read lock.
fn get_or_insert<V>(map: &DashMap<Uuid, Arc<V>>, key: Uuid, make: impl FnOnce() -> V) -> Arc<V> {
    let existing = map.get(&key).map(|v| Arc::clone(&v));
    existing.unwrap_or_else(|| map.entry(key).or_insert_with(|| Arc::new(make())).clone())
}

/// Holds one in-flight slot of a key until dropped.
pub struct InFlight {
    slot: Option<Arc<AtomicU32>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// An admitted request: its headers and its in-flight slot.
pub struct Admission {
    pub headers: Option<RateHeaders>,
    pub in_flight: InFlight,
    quota: Option<Arc<QuotaCounter>>,
}

impl Admission {
    /// Counts the request against its quota: once every limit has admitted it.
    pub fn count(&mut self) {
        if let Some(counter) = self.quota.take() {
            counter.requests.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Limits<DefaultClock> {
    pub fn new(tenant_per_second: u32, tenant_burst: u32) -> Self {
        Limits::with_clock(tenant_per_second, tenant_burst, DefaultClock::default())
    }
}

/// Default widget limits: messages per visitor and sessions per client
/// address, per minute (see `[widget]` in the settings).
const VISITOR_MESSAGES_PER_MINUTE: u32 = 20;
const SESSIONS_PER_ADDRESS_PER_MINUTE: u32 = 30;

impl<C: Clock + Clone> Limits<C> {
    pub fn with_clock(tenant_per_second: u32, tenant_burst: u32, clock: C) -> Self {
        let quota =
            Quota::per_second(nonzero(tenant_per_second)).allow_burst(nonzero(tenant_burst));
        let per_minute = |n: u32| Quota::per_minute(nonzero(n));
        Limits {
            tenants: RateLimiter::dashmap_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            visitors: RateLimiter::dashmap_with_clock(
                per_minute(VISITOR_MESSAGES_PER_MINUTE),
                clock.clone(),
            )
            .with_middleware::<StateInformationMiddleware>(),
            addresses: RateLimiter::dashmap_with_clock(
                per_minute(SESSIONS_PER_ADDRESS_PER_MINUTE),
                clock.clone(),
            )
            .with_middleware::<StateInformationMiddleware>(),
            clock,
            per_plan: DashMap::new(),
            in_flight: DashMap::new(),
            quotas: DashMap::new(),
        }
    }

    /// Decides whether `key` may send one more request now, on this gateway's
    /// buckets; the request counts against its quota once [`Admission::count`]
    /// says every limit (these and the shared ones) admitted it. Of the plan's
    /// `max_concurrency` this gateway holds `ceil(max ÷ gateways)`.
    pub fn admit(
        &self,
        key: &KeyEntry,
        plan: Option<&PlanLimits>,
        quota: &QuotaUsage,
        now_ms: i64,
        gateways: u32,
    ) -> Result<Admission, GatewayError> {
        // Quota first: it does not consume rate-limit tokens when refused.
        let counted = match plan {
            Some(plan) => self.check_quota(key.config, plan, quota, now_ms)?,
            None => None,
        };
        let tenant = self
            .tenants
            .check_key(&key.tenant)
            .map_err(|not_until| self.refusal(RateLimit::Tenant, &not_until))?;
        let mut headers = Some(self.headers(&tenant));
        if let Some(rpm) = plan.and_then(|p| p.requests_per_minute) {
            let burst = plan.and_then(|p| p.burst).unwrap_or(rpm).max(1);
            let limiter = self.plan_limiter(rpm, burst);
            let state = limiter
                .check_key(&key.key_id)
                .map_err(|not_until| self.refusal(RateLimit::Key, &not_until))?;
            headers = Some(self.headers(&state));
        }
        let in_flight = match plan.and_then(|p| p.max_concurrency) {
            Some(max) => {
                let max = max.div_ceil(gateways.max(1));
                let slot = get_or_insert(&self.in_flight, key.key_id, || AtomicU32::new(0));
                if slot.fetch_add(1, Ordering::AcqRel) >= max {
                    slot.fetch_sub(1, Ordering::AcqRel);
                    return Err(GatewayError::TooManyInFlight { limit: max });
                }
                InFlight { slot: Some(slot) }
            }
            None => InFlight { slot: None },
        };
        Ok(Admission {
            headers,
            in_flight,
            quota: counted,
        })
    }

    /// The same limits with widget visitors allowed `messages` per minute each
    /// and `sessions` visitor sessions per minute from one client address.
    pub fn with_widget_limits(mut self, messages: u32, sessions: u32) -> Self {
        self.visitors = RateLimiter::dashmap_with_clock(
            Quota::per_minute(nonzero(messages)),
            self.clock.clone(),
        )
        .with_middleware::<StateInformationMiddleware>();
        self.addresses = RateLimiter::dashmap_with_clock(
            Quota::per_minute(nonzero(sessions)),
            self.clock.clone(),
        )
        .with_middleware::<StateInformationMiddleware>();
        self
    }

    /// One message of a widget visitor.
    pub fn admit_visitor(&self, visitor: &Uuid) -> Result<RateHeaders, GatewayError> {
        self.visitors
            .check_key(visitor)
            .map(|state| self.headers(&state))
            .map_err(|not_until| self.refusal(RateLimit::Visitor, &not_until))
    }

    /// One visitor session opened from `address` (none known: not limited here).
    pub fn admit_session(&self, address: Option<IpAddr>) -> Result<(), GatewayError> {
        match address {
            Some(ip) => self
                .addresses
                .check_key(&ip)
                .map(|_| ())
                .map_err(|not_until| self.refusal(RateLimit::Address, &not_until)),
            None => Ok(()),
        }
    }

    /// Adds the tokens a finished request used to its config's quota count.
    pub fn record_tokens(&self, config: Uuid, tokens: u64) {
        if let Some(counter) = self.quotas.get(&config) {
            counter.tokens.fetch_add(tokens, Ordering::Relaxed);
        }
    }

    fn check_quota(
        &self,
        config: Uuid,
        plan: &PlanLimits,
        quota: &QuotaUsage,
        now_ms: i64,
    ) -> Result<Option<Arc<QuotaCounter>>, GatewayError> {
        if plan.request_quota.is_none() && plan.token_quota.is_none() {
            return Ok(None);
        }
        // The count is of a period that has ended: a new period starts with its
        // quota whole, and the control plane's next count brings its numbers.
        if quota.period_end_ms > 0 && now_ms >= quota.period_end_ms {
            return Ok(None);
        }
        let current = self
            .quotas
            .get(&config)
            .map(|c| Arc::clone(&c))
            .filter(|c| c.counted_at_ms == quota.counted_at_ms);
        let counter = current.unwrap_or_else(|| {
            let mut counter = self
                .quotas
                .entry(config)
                .or_insert_with(|| QuotaCounter::since(quota.counted_at_ms));
            // A newer count from the control plane includes what we served before it.
            if counter.counted_at_ms != quota.counted_at_ms {
                *counter = QuotaCounter::since(quota.counted_at_ms);
            }
            counter.clone()
        });
        let requests = quota.requests
            + counter.requests.load(Ordering::Relaxed)
            + counter.others_requests.load(Ordering::Relaxed);
        let tokens = quota.tokens
            + counter.tokens.load(Ordering::Relaxed)
            + counter.others_tokens.load(Ordering::Relaxed);
        let over = plan.request_quota.is_some_and(|q| requests >= q)
            || plan.token_quota.is_some_and(|q| tokens >= q);
        if over {
            let retry_after_secs = if quota.period_end_ms > now_ms {
                ((quota.period_end_ms - now_ms) as u64).div_ceil(1000)
            } else {
                3600
            };
            return Err(GatewayError::QuotaExceeded { retry_after_secs });
        }
        Ok(Some(counter))
    }

    fn plan_limiter(&self, rpm: u32, burst: u32) -> Arc<Keyed<C>> {
        if let Some(limiter) = self.per_plan.get(&(rpm, burst)) {
            return limiter.clone();
        }
        self.per_plan
            .entry((rpm, burst))
            .or_insert_with(|| {
                let quota = Quota::per_minute(nonzero(rpm)).allow_burst(nonzero(burst));
                Arc::new(
                    RateLimiter::dashmap_with_clock(quota, self.clock.clone())
                        .with_middleware::<StateInformationMiddleware>(),
                )
            })
            .clone()
    }

    fn headers(&self, state: &StateSnapshot) -> RateHeaders {
        let quota = state.quota();
        let limit = quota.burst_size().get();
        let remaining = state.remaining_burst_capacity();
        let missing = u64::from(limit.saturating_sub(remaining));
        let reset = quota.replenish_interval().as_secs_f64() * missing as f64;
        RateHeaders {
            limit,
            remaining,
            reset_secs: reset.ceil() as u64,
        }
    }

    fn refusal(&self, limit: RateLimit, not_until: &NotUntil<C::Instant>) -> GatewayError {
        let wait = not_until.wait_time_from(self.clock.now());
        let quota = not_until.quota();
        let burst = quota.burst_size().get();
        let full = quota.replenish_interval().as_secs_f64() * f64::from(burst);
        GatewayError::RateLimited {
            limit,
            retry_after_secs: (wait.as_secs_f64().ceil() as u64).max(1),
            headers: RateHeaders {
                limit: burst,
                remaining: 0,
                reset_secs: full.ceil() as u64,
            },
        }
    }

    /// Forgets state that no longer matters: buckets that are full again, idle
    /// in-flight counters, and quota counters of configs `keep` rejects.
    pub fn prune(&self, keep_config: impl Fn(&Uuid) -> bool) {
        self.tenants.retain_recent();
        self.tenants.shrink_to_fit();
        self.visitors.retain_recent();
        self.visitors.shrink_to_fit();
        self.addresses.retain_recent();
        self.addresses.shrink_to_fit();
        for limiter in self.per_plan.iter() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.per_plan.retain(|_, limiter| !limiter.is_empty());
        self.in_flight
            .retain(|_, slot| Arc::strong_count(slot) > 1 || slot.load(Ordering::Acquire) > 0);
        self.quotas.retain(|config, _| keep_config(config));
    }

    /// Every config's quota counter, for the shared count.
    pub fn quota_counters(&self) -> Vec<(Uuid, Arc<QuotaCounter>)> {
        self.quotas
            .iter()
            .map(|item| (*item.key(), item.value().clone()))
            .collect()
    }

    /// Entries held, for tests and metrics.
    pub fn state_entries(&self) -> usize {
        self.tenants.len()
            + self.visitors.len()
            + self.addresses.len()
            + self.per_plan.iter().map(|l| l.len()).sum::<usize>()
            + self.in_flight.len()
            + self.quotas.len()
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("at least 1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_config::keys::{KeyKind, Mode, Scope};
    use agora_config::snapshot::{BillingInterval, KeyStatus};
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    fn key(n: u128, tenant: u128) -> KeyEntry {
        KeyEntry {
            key_id: Uuid::from_u128(n),
            kind: KeyKind::SecretLive,
            config: Uuid::from_u128(1000 + n),
            tenant: Uuid::from_u128(tenant),
            project: None,
            scopes: vec![Scope::Invoke],
            status: KeyStatus::Active,
            plan: Some(Uuid::from_u128(9)),
            mode: Mode::Live,
            expires_at: None,
        }
    }

    /// Admits on one gateway and counts the request, as the gateway does once
    /// every limit has admitted it.
    fn take(
        limits: &Limits<FakeRelativeClock>,
        key: &KeyEntry,
        plan: Option<&PlanLimits>,
        quota: &QuotaUsage,
        now_ms: i64,
    ) -> Result<Admission, GatewayError> {
        limits.admit(key, plan, quota, now_ms, 1).map(|mut a| {
            a.count();
            a
        })
    }

    #[test]
    fn with_several_gateways_each_holds_its_share_of_in_flight_slots() {
        let limits = Limits::with_clock(1000, 1000, FakeRelativeClock::default());
        let k = key(1, 1);
        let p = PlanLimits {
            max_concurrency: Some(5),
            ..plan(None, None)
        };
        let q = QuotaUsage::default();
        let held: Vec<_> = (0..2)
            .map(|_| limits.admit(&k, Some(&p), &q, 0, 3).unwrap())
            .collect();
        assert!(matches!(
            limits.admit(&k, Some(&p), &q, 0, 3),
            Err(GatewayError::TooManyInFlight { limit: 2 })
        ));
        drop(held);
    }

    #[test]
    fn a_request_counts_against_its_quota_only_once_counted() {
        let limits = Limits::with_clock(1000, 1000, FakeRelativeClock::default());
        let k = key(1, 1);
        let p = PlanLimits {
            request_quota: Some(1),
            ..plan(None, None)
        };
        let q = QuotaUsage {
            period_end_ms: 10_000,
            counted_at_ms: 1,
            ..QuotaUsage::default()
        };
        // Admitted here but refused by a shared limit afterwards: not counted.
        drop(limits.admit(&k, Some(&p), &q, 0, 1).unwrap());
        let mut a = limits.admit(&k, Some(&p), &q, 0, 1).unwrap();
        a.count();
        assert!(matches!(
            limits.admit(&k, Some(&p), &q, 0, 1),
            Err(GatewayError::QuotaExceeded { .. })
        ));
        // What other gateways served counts too.
        let newer = QuotaUsage {
            counted_at_ms: 2,
            ..q
        };
        let p2 = PlanLimits {
            request_quota: Some(10),
            ..p
        };
        assert!(limits.admit(&k, Some(&p2), &newer, 0, 1).is_ok());
        let (_, counter) = limits.quota_counters().pop().unwrap();
        counter.reported(0, 0, 10, 0);
        assert!(!counter.unreported());
        assert!(matches!(
            limits.admit(&k, Some(&p2), &newer, 0, 1),
            Err(GatewayError::QuotaExceeded { .. })
        ));
    }

    fn plan(rpm: Option<u32>, burst: Option<u32>) -> PlanLimits {
        PlanLimits {
            plan: Uuid::from_u128(9),
            requests_per_minute: rpm,
            burst,
            max_concurrency: None,
            request_quota: None,
            token_quota: None,
            interval: BillingInterval::Month,
        }
    }

    #[test]
    fn per_key_bucket_refuses_then_refills() {
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(1000, 1000, clock.clone());
        let k = key(1, 1);
        let p = plan(Some(60), Some(3));
        let q = QuotaUsage::default();
        for expected_remaining in [2, 1, 0] {
            let a = take(&limits, &k, Some(&p), &q, 0).unwrap();
            assert_eq!(a.headers.unwrap().limit, 3);
            assert_eq!(a.headers.unwrap().remaining, expected_remaining);
        }
        match take(&limits, &k, Some(&p), &q, 0) {
            Err(GatewayError::RateLimited {
                limit,
                retry_after_secs,
                headers,
            }) => {
                assert_eq!(limit, RateLimit::Key);
                assert_eq!(retry_after_secs, 1);
                assert_eq!(headers.remaining, 0);
                assert_eq!(headers.limit, 3);
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        // Another key on the same plan has its own bucket.
        assert!(take(&limits, &key(2, 1), Some(&p), &q, 0).is_ok());
        clock.advance(Duration::from_secs(1));
        assert!(take(&limits, &k, Some(&p), &q, 0).is_ok());
    }

    #[test]
    fn tenant_bucket_spans_keys() {
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(1, 2, clock.clone());
        let q = QuotaUsage::default();
        assert!(take(&limits, &key(1, 7), None, &q, 0).is_ok());
        assert!(take(&limits, &key(2, 7), None, &q, 0).is_ok());
        match take(&limits, &key(3, 7), None, &q, 0) {
            Err(GatewayError::RateLimited { limit, .. }) => assert_eq!(limit, RateLimit::Tenant),
            _ => panic!("tenant limit should refuse"),
        }
        assert!(
            take(&limits, &key(4, 8), None, &q, 0).is_ok(),
            "other tenant"
        );
    }

    #[test]
    fn in_flight_slots_release_on_drop() {
        let limits = Limits::with_clock(1000, 1000, FakeRelativeClock::default());
        let k = key(1, 1);
        let p = PlanLimits {
            max_concurrency: Some(2),
            ..plan(None, None)
        };
        let q = QuotaUsage::default();
        let a = take(&limits, &k, Some(&p), &q, 0).unwrap();
        let b = take(&limits, &k, Some(&p), &q, 0).unwrap();
        assert!(matches!(
            take(&limits, &k, Some(&p), &q, 0),
            Err(GatewayError::TooManyInFlight { limit: 2 })
        ));
        drop(a);
        let c = take(&limits, &k, Some(&p), &q, 0).unwrap();
        drop((b, c));
        limits.prune(|_| true);
        assert_eq!(limits.in_flight.len(), 0, "idle counters are pruned");
    }

    #[test]
    fn quotas_count_from_the_snapshot_plus_local_use() {
        let limits = Limits::with_clock(1000, 1000, FakeRelativeClock::default());
        let k = key(1, 1);
        let p = PlanLimits {
            request_quota: Some(5),
            token_quota: Some(100),
            ..plan(None, None)
        };
        let q = QuotaUsage {
            period_start_ms: 0,
            period_end_ms: 10_000,
            counted_at_ms: 1,
            requests: 3,
            tokens: 0,
        };
        assert!(take(&limits, &k, Some(&p), &q, 0).is_ok());
        assert!(take(&limits, &k, Some(&p), &q, 0).is_ok());
        match take(&limits, &k, Some(&p), &q, 1_000) {
            Err(GatewayError::QuotaExceeded { retry_after_secs }) => {
                assert_eq!(retry_after_secs, 9)
            }
            _ => panic!("request quota should refuse"),
        }
        // A newer count replaces the local one.
        let newer = QuotaUsage {
            counted_at_ms: 2,
            requests: 0,
            ..q
        };
        assert!(take(&limits, &k, Some(&p), &newer, 0).is_ok());
        limits.record_tokens(k.config, 100);
        assert!(matches!(
            take(&limits, &k, Some(&p), &newer, 0),
            Err(GatewayError::QuotaExceeded { .. })
        ));
        // Once the counted period has ended, its count no longer refuses.
        assert!(take(&limits, &k, Some(&p), &newer, 10_000).is_ok());
    }

    #[test]
    fn state_stays_bounded_under_many_keys() {
        let clock = FakeRelativeClock::default();
        let limits = Limits::with_clock(1000, 1000, clock.clone());
        let p = plan(Some(600), Some(10));
        let q = QuotaUsage::default();
        for n in 0..10_000u128 {
            let _ = take(&limits, &key(n, n), Some(&p), &q, 0);
        }
        assert!(limits.state_entries() >= 20_000);
        clock.advance(Duration::from_secs(120));
        limits.prune(|_| false);
        assert_eq!(limits.state_entries(), 0, "full buckets are forgotten");
    }
}
