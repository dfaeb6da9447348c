//! Limits that hold across gateways, through one Redis (`[redis] url`).
//!
//! Without Redis each gateway enforces a plan's limits alone, so N gateways
//! behind a balancer admit up to N times a limit. With Redis, on top of the
//! local buckets ([`crate::ratelimit`]), each limit is a count per window
//! shared by every gateway:
//!
//! - **Per key**: the plan's `requests_per_minute` per 60 s window; **per
//!   tenant**: `tenant_requests_per_second` per 1 s window. Windows are aligned
//!   to the Unix epoch, the same on every gateway.
//! - **Leases.** A gateway never asks Redis per request. It claims a lease of
//!   some of a window's remaining count (`INCRBY` in a Lua script, capped at
//!   the limit) and admits locally while the lease lasts; a background round
//!   tops leases up in one batched script call for every limit in use (at most
//!   1,000 per call, the rest at once after), sized to the limit's recent rate
//!   and to a share of what remains (remaining ÷ 4N), so leases shrink as a
//!   window runs out. Because every admission is paid from a claim and claims
//!   never pass the limit, **while Redis answers within `[redis] timeout_ms`
//!   the gateways together admit at most the limit per window**; under load
//!   they admit all of it but the leases left unspent when the window ends.
//! - **The slow path.** A request whose lease is spent (or the first of a
//!   window) waits for the next round, at most `[redis] timeout_ms` (25 ms by
//!   default, far below any request's own timeout; one wait covers both the
//!   tenant's and the key's limit). A window known to be used up is refused at
//!   once, with `Retry-After` to its end. A request still waiting at the
//!   timeout is decided on this gateway's share (below), while the window's
//!   last known count leaves a tenth of the limit: each such decision (counted
//!   in `agora_proxy_global_limits_wait_timeouts_total`) can take the window
//!   past the limit by one.
//! - **Redis unreachable.** A round that fails or times out turns the gateway
//!   to its **share** of each limit, `ceil(limit ÷ N)` of its own admissions
//!   per window, where N is the number of gateways alive at the last heartbeat
//!   (every round writes one, on Redis' clock; a gateway is alive for 3 s after
//!   its last; N is 1 until the first, and does not fall for 3 s after Redis
//!   returns, while the others write theirs again). Nothing waits on Redis then; health says
//!   `"limits": {"mode": "local_share"}` and the metric
//!   `agora_proxy_global_limits_degraded` is 1. Rounds keep trying every
//!   250 ms on a new connection (a failover's new primary is found); the first
//!   that succeeds turns the gateway back (so recovery is within about 0.5 s of
//!   Redis answering again), and the admissions made on the share are added to
//!   the window's count then; a limit decided on the share in a window stays on
//!   it until that window ends (so the shares' counts, arriving from each
//!   gateway in turn, do not meet leases granted meanwhile): in a window with
//!   an outage the gateways together admit at most `N × ceil(limit ÷ N)`. A round that timed out may have been applied, so
//!   its additions are not sent again: a window then counts less, never more.
//! - **In flight per key** cannot be leased ahead of time (slots come back), so
//!   each gateway holds `ceil(max_concurrency ÷ N)`: the gateways together hold
//!   at most `max_concurrency + N − 1`.
//! - **Quotas** (requests and tokens per billing period): each round writes
//!   what this gateway served since the control plane's count under its own
//!   field of a hash per config and count (so a round sent twice counts once),
//!   and reads back the sum, so each gateway refuses on the total; a quota can
//!   be passed by at most what the gateways serve in one round (20 ms by
//!   default).
//! - Widget visitor and client-address limits stay per gateway.
//!
//! One Redis (or a primary with replicas) serves all gateways; every key Agora
//! writes starts with `[redis] key_prefix` and expires on its own.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

use crate::error::{GatewayError, RateHeaders, RateLimit};
use crate::ratelimit::Limits;
use crate::redis::{Connection, RedisError, RedisUrl, Reply};

/// A gateway is counted alive this long after its last heartbeat.
const ALIVE_MS: i64 = 3_000;
/// How often a gateway that has lost Redis tries it again.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// How often a gateway with nothing to claim still says it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(1_000);
/// Windows a limit may go unused before its entry is forgotten.
const IDLE_WINDOWS: i64 = 2;

/// The script of one round: a heartbeat (on Redis' clock, so gateways'
/// clocks do not matter), then for each limit a claim (with the admissions
/// already made on the local share added first), then for each quota this
/// gateway's totals, written under its own field (so a round sent twice counts
/// once); it answers the live gateway count, each limit's grant and window
/// total, and each quota's totals over all gateways.
///
/// KEYS: the gateway set, then one counter per limit, then one hash per quota.
/// ARGV: gateway id, alive_ms, limit count, then per limit (limit, want, debt,
/// ttl_ms), then per quota (requests, tokens, ttl_ms).
const ROUND_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gw, alive = ARGV[1], tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, gw)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - alive)
redis.call('PEXPIRE', KEYS[1], alive * 10)
local out = {redis.call('ZCARD', KEYS[1])}
local limits = tonumber(ARGV[3])
local a = 4
for i = 2, limits + 1 do
  local limit, want, debt, ttl = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
  a = a + 4
  local used = tonumber(redis.call('GET', KEYS[i]) or '0') + debt
  local grant = math.max(0, math.min(want, limit - used))
  used = used + grant
  if debt + grant > 0 then
    redis.call('INCRBY', KEYS[i], debt + grant)
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  out[#out+1] = grant
  out[#out+1] = used
end
for i = limits + 2, #KEYS do
  redis.call('HSET', KEYS[i], gw .. ':r', ARGV[a], gw .. ':t', ARGV[a+1])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[a+2]))
  a = a + 3
  local all = redis.call('HGETALL', KEYS[i])
  local requests, tokens = 0, 0
  for j = 1, #all, 2 do
    if string.sub(all[j], -2) == ':r' then
      requests = requests + tonumber(all[j+1])
    else
      tokens = tokens + tonumber(all[j+1])
    end
  end
  out[#out+1] = requests
  out[#out+1] = tokens
end
return out
"#;

/// At most this many limits, and as many quotas, go in one round; the rest go
/// in the next, at once.
const MAX_PER_ROUND: usize = 1_000;

/// How limits are being decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through Redis: the limits hold across gateways.
    Global,
    /// Redis is unreachable: each gateway holds its share.
    LocalShare,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Global => "global",
            Mode::LocalShare => "local_share",
        }
    }
}

/// How to reach Redis and how often to reconcile.
#[derive(Clone, Debug)]
pub struct GlobalConfig {
    pub url: RedisUrl,
    pub timeout: Duration,
    pub interval: Duration,
    pub key_prefix: String,
}

/// Counts of rounds, for metrics.
#[derive(Default)]
pub struct GlobalStats {
    pub rounds_ok: AtomicU64,
    pub rounds_failed: AtomicU64,
    /// Requests that waited for a round.
    pub waits: AtomicU64,
    /// Requests decided on the local share because Redis did not answer in time.
    pub wait_timeouts: AtomicU64,
}

pub struct Global {
    config: GlobalConfig,
    gateway_id: String,
    entries: DashMap<(RateLimit, Uuid), Arc<Entry>>,
    /// Set while Redis answers rounds.
    connected: AtomicBool,
    /// Gateways alive at the last heartbeat (at least 1).
    gateways: AtomicU32,
    /// Rounds completed, so waiting requests know when to look again.
    rounds: tokio::sync::watch::Sender<u64>,
    wake: tokio::sync::Notify,
    pub stats: GlobalStats,
}

/// One limit's state on this gateway.
struct Entry {
    state: Mutex<EntryState>,
}

#[derive(Default)]
struct EntryState {
    limit: u64,
    window_ms: i64,
    /// The window (its start ÷ its width) the rest is about.
    window: i64,
    /// Admissions this gateway may still make in the window.
    lease: u64,
    /// The window's count as Redis last said.
    used: u64,
    /// Requests waiting for a claim.
    want: u64,
    /// Admissions made on the local share, not yet in the window's count.
    debt: u64,
    /// Admissions this gateway made in the window.
    admitted: u64,
    /// Admissions since the last round: the rate a lease is sized to.
    recent: u64,
    /// Decided on the share while Redis was away: the rest of the window is
    /// too, so the shares' debts, added when Redis returns, cannot meet leases
    /// granted meanwhile.
    on_share: bool,
}

impl EntryState {
    /// Moves to `window` if it is later (a request's clock a little behind
    /// another's stays in the window already begun).
    fn roll(&mut self, window: i64) {
        if window > self.window {
            // The rate carries over, so the new window's first leases fit it.
            *self = EntryState {
                limit: self.limit,
                window_ms: self.window_ms,
                window,
                recent: self.recent,
                ..EntryState::default()
            };
        }
    }

    fn exhausted(&self) -> bool {
        self.used >= self.limit
    }

    fn share(&self, gateways: u32) -> u64 {
        self.limit.div_ceil(u64::from(gateways.max(1)))
    }

    /// A 429 to retry after `retry_after_secs` (none: when the window ends).
    fn refusal(
        &self,
        limit: RateLimit,
        now_ms: i64,
        retry_after_secs: Option<u64>,
    ) -> GatewayError {
        let end = (self.window + 1) * self.window_ms;
        let wait_secs = ((end - now_ms).max(1) as u64).div_ceil(1000);
        GatewayError::RateLimited {
            limit,
            retry_after_secs: retry_after_secs.unwrap_or(wait_secs).max(1),
            headers: RateHeaders {
                limit: u32::try_from(self.limit).unwrap_or(u32::MAX),
                remaining: 0,
                reset_secs: wait_secs,
            },
        }
    }
}

/// What one look at an entry decided.
enum Look {
    Admit(i64),
    Refuse(GatewayError),
    Wait,
}

impl Global {
    pub fn new(config: GlobalConfig) -> Arc<Global> {
        Arc::new(Global {
            config,
            gateway_id: Uuid::new_v4().simple().to_string(),
            entries: DashMap::new(),
            connected: AtomicBool::new(false),
            gateways: AtomicU32::new(1),
            rounds: tokio::sync::watch::channel(0).0,
            wake: tokio::sync::Notify::new(),
            stats: GlobalStats::default(),
        })
    }

    pub fn mode(&self) -> Mode {
        if self.connected.load(Ordering::Relaxed) {
            Mode::Global
        } else {
            Mode::LocalShare
        }
    }

    /// Gateways alive at the last heartbeat (1 before the first).
    pub fn gateways(&self) -> u32 {
        self.gateways.load(Ordering::Relaxed).max(1)
    }

    /// The latest a request that starts now waits for Redis.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.config.timeout
    }

    /// Admits one request against the shared count of `limit` for `id`:
    /// `count` per `window_ms`, waiting for Redis until `deadline` at most.
    /// Answers the window it was counted in (a request whose clock is a little
    /// behind is counted in the window already begun).
    pub async fn admit(
        &self,
        limit: RateLimit,
        id: Uuid,
        count: u64,
        window_ms: i64,
        now_ms: i64,
        deadline: Instant,
    ) -> Result<i64, GatewayError> {
        let entry = self.entry(limit, id);
        let mut waited = false;
        let mut rounds = self.rounds.subscribe();
        loop {
            match self.look(&entry, limit, count, window_ms, now_ms, waited) {
                Look::Admit(window) => return Ok(window),
                Look::Refuse(refusal) => return Err(refusal),
                Look::Wait => {}
            }
            if !waited {
                waited = true;
                self.stats.waits.fetch_add(1, Ordering::Relaxed);
            }
            self.wake.notify_one();
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero()
                || tokio::time::timeout(remaining, rounds.changed())
                    .await
                    .is_err()
            {
                self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                let mut st = Self::current(&entry, count, window_ms, now_ms);
                // This request's want, if no round took it.
                st.want = st.want.saturating_sub(1);
                return self.on_share(&mut st, limit, now_ms);
            }
        }
    }

    fn entry(&self, limit: RateLimit, id: Uuid) -> Arc<Entry> {
        let key = (limit, id);
        if let Some(entry) = self.entries.get(&key) {
            return entry.clone();
        }
        self.entries
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Entry {
                    state: Mutex::new(EntryState::default()),
                })
            })
            .clone()
    }

    fn lock(entry: &Entry) -> std::sync::MutexGuard<'_, EntryState> {
        entry.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry's state for a request at `now_ms` against `count` per
    /// `window_ms` (a plan's limit may have changed since the last).
    fn current(
        entry: &Entry,
        count: u64,
        window_ms: i64,
        now_ms: i64,
    ) -> std::sync::MutexGuard<'_, EntryState> {
        let mut st = Self::lock(entry);
        st.limit = count;
        st.window_ms = window_ms;
        st.roll(now_ms.div_euclid(window_ms));
        st
    }

    fn look(
        &self,
        entry: &Entry,
        limit: RateLimit,
        count: u64,
        window_ms: i64,
        now_ms: i64,
        again: bool,
    ) -> Look {
        let mut st = Self::current(entry, count, window_ms, now_ms);
        if !self.connected.load(Ordering::Relaxed) || st.on_share {
            return match self.on_share(&mut st, limit, now_ms) {
                Ok(window) => Look::Admit(window),
                Err(e) => Look::Refuse(e),
            };
        }
        if st.lease > 0 {
            st.lease -= 1;
            st.admitted += 1;
            st.recent += 1;
            return Look::Admit(st.window);
        }
        if st.exhausted() {
            return Look::Refuse(st.refusal(limit, now_ms, None));
        }
        // A request that looks again after a round has registered its want.
        if !again || st.want == 0 {
            st.want += 1;
        }
        Look::Wait
    }

    /// Decides on this gateway's share of the limit, `ceil(limit ÷ N)` of its
    /// own admissions in the window, counting an admission as debt for the
    /// window's shared count. Used while Redis is away, and for a request whose
    /// round is slower than it may wait: then only while the window's last known
    /// count leaves a tenth of the limit, and a refusal says to retry in a second
    /// (the next round will likely answer).
    fn on_share(
        &self,
        st: &mut EntryState,
        limit: RateLimit,
        now_ms: i64,
    ) -> Result<i64, GatewayError> {
        let share = st.share(self.gateways());
        let connected = self.connected.load(Ordering::Relaxed);
        let room = if connected && !st.on_share {
            st.used + st.debt < st.limit - st.limit / 10
        } else {
            !st.exhausted()
        };
        if st.admitted < share && room {
            st.admitted += 1;
            st.recent += 1;
            st.debt += 1;
            st.on_share |= !connected;
            Ok(st.window)
        } else if connected && !st.exhausted() {
            Err(st.refusal(limit, now_ms, Some(1)))
        } else {
            Err(st.refusal(limit, now_ms, None))
        }
    }

    /// Runs rounds until `stop`: when a request waits, every `interval` while
    /// limits are in use, and at least every second as a heartbeat.
    pub async fn run(
        self: Arc<Self>,
        limits: Arc<Limits>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut conn: Option<(Connection, String)> = None;
        let mut last_round = Instant::now() - HEARTBEAT_EVERY;
        let mut last_attempt = Instant::now() - RETRY_EVERY;
        let mut warned = false;
        let mut last_failure: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = stop.changed() => return,
            }
            let connected = self.connected.load(Ordering::Relaxed);
            if !connected && last_attempt.elapsed() < RETRY_EVERY {
                // Waiting requests decide on the share; tell them now.
                self.rounds.send_modify(|r| *r += 1);
                continue;
            }
            let now_ms = crate::sync::now_ms();
            let heartbeat = last_round.elapsed() >= HEARTBEAT_EVERY;
            let work = self.collect(now_ms, &limits, heartbeat);
            if work.is_empty() && !heartbeat {
                continue;
            }
            last_attempt = Instant::now();
            let result = self.round(&mut conn, &work).await;
            match result {
                Ok(reply) => {
                    last_round = Instant::now();
                    let recovering = last_failure
                        .is_some_and(|at| at.elapsed() < Duration::from_millis(ALIVE_MS as u64));
                    self.apply(&work, &reply, recovering);
                    self.stats.rounds_ok.fetch_add(1, Ordering::Relaxed);
                    warned = false;
                    if !self.connected.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            gateways = self.gateways(),
                            "Redis answers: limits hold across gateways"
                        );
                    }
                }
                Err(e) => {
                    // A round that timed out may have been applied: its debts
                    // are not sent again (a window may then count less, never
                    // more). Waiting requests register again when they look.
                    if !matches!(e, RedisError::Timeout(_)) {
                        self.restore(&work);
                    }
                    self.stats.rounds_failed.fetch_add(1, Ordering::Relaxed);
                    last_failure = Some(Instant::now());
                    // A server error may mean a failover (READONLY): a new
                    // connection finds the new primary.
                    conn = None;
                    self.connected.store(false, Ordering::Relaxed);
                    if !warned {
                        warned = true;
                        tracing::warn!(error = %e, gateways = self.gateways(), "Redis is unreachable: each gateway holds its share of the limits");
                    }
                }
            }
            if work.full {
                self.wake.notify_one();
            }
            self.rounds.send_modify(|r| *r += 1);
            if heartbeat {
                self.prune(now_ms);
            }
        }
    }

    /// Takes what this round claims and reports.
    /// Quotas are all read back on a heartbeat round, else only those this
    /// gateway has served since the last.
    fn collect(&self, now_ms: i64, limits: &Limits, heartbeat: bool) -> Work {
        let gateways = u64::from(self.gateways());
        let mut work = Work::default();
        for item in self.entries.iter() {
            if work.limits.len() == MAX_PER_ROUND {
                work.full = true;
                break;
            }
            let (limit, id) = *item.key();
            let mut st = Self::lock(item.value());
            if st.window_ms == 0 {
                continue;
            }
            // A window that has ended is claimed for only by requests still
            // waiting in it.
            let stale = st.window < now_ms.div_euclid(st.window_ms);
            if stale && st.want == 0 {
                st.recent = 0;
                st.debt = 0;
                continue;
            }
            let remaining = st.limit.saturating_sub(st.used);
            // Enough for two rounds at the recent rate, at most a quarter of
            // this gateway's part of what remains, at least one.
            let target = (st.recent * 2)
                .max(1)
                .min((remaining / (4 * gateways)).max(1));
            let low = !stale && st.lease < target.div_ceil(2) && st.recent > 0;
            if st.want == 0 && st.debt == 0 && !low {
                st.recent = 0;
                continue;
            }
            let want = if st.exhausted() {
                0
            } else {
                (st.want + target).saturating_sub(st.lease)
            };
            work.limits.push(Claim {
                limit,
                id,
                window: st.window,
                count: st.limit,
                window_ms: st.window_ms,
                want,
                debt: st.debt,
            });
            st.want = 0;
            st.debt = 0;
            st.recent = 0;
        }
        for item in limits.quota_counters() {
            let (config, counter) = item;
            if !counter.unreported() && !heartbeat {
                continue;
            }
            if work.quotas.len() == MAX_PER_ROUND {
                work.full = true;
                break;
            }
            let (requests, tokens) = counter.served();
            work.quotas.push(QuotaReport {
                config,
                counted_at_ms: counter.counted_at_ms(),
                requests,
                tokens,
                counter,
            });
        }
        work
    }

    async fn round(
        &self,
        conn: &mut Option<(Connection, String)>,
        work: &Work,
    ) -> Result<Vec<i64>, RedisError> {
        if conn.is_none() {
            // A round may take longer than a request may wait for it.
            let timeout = (self.config.timeout * 4).max(Duration::from_millis(100));
            let mut c = Connection::open(&self.config.url, timeout).await?;
            let sha = match c
                .call(&[b"SCRIPT", b"LOAD", ROUND_SCRIPT.as_bytes()])
                .await?
            {
                Reply::Bulk(sha) => String::from_utf8_lossy(&sha).into_owned(),
                _ => return Err(RedisError::Protocol("SCRIPT LOAD answered no digest")),
            };
            *conn = Some((c, sha));
        }
        let (c, sha) = conn.as_mut().expect("connected above");
        let p = &self.config.key_prefix;
        let mut keys: Vec<String> = Vec::with_capacity(1 + work.limits.len() + work.quotas.len());
        keys.push(format!("{p}:gateways"));
        for claim in &work.limits {
            keys.push(format!(
                "{p}:limit:{}:{}:{}",
                claim.limit.key_word(),
                claim.id.simple(),
                claim.window
            ));
        }
        for quota in &work.quotas {
            keys.push(format!(
                "{p}:quota:{}:{}",
                quota.config.simple(),
                quota.counted_at_ms
            ));
        }
        let mut argv: Vec<String> = vec![
            self.gateway_id.clone(),
            ALIVE_MS.to_string(),
            work.limits.len().to_string(),
        ];
        for claim in &work.limits {
            argv.push(claim.count.to_string());
            argv.push(claim.want.to_string());
            argv.push(claim.debt.to_string());
            argv.push((claim.window_ms * 2 + 1_000).to_string());
        }
        for quota in &work.quotas {
            argv.push(quota.requests.to_string());
            argv.push(quota.tokens.to_string());
            // A count is replaced within minutes; a day is plenty.
            argv.push("86400000".into());
        }
        let nkeys = keys.len().to_string();
        let mut args: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), nkeys.as_bytes()];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        args.extend(argv.iter().map(|a| a.as_bytes()));
        let reply = match c.call(&args).await {
            Err(RedisError::Server(message)) if message.starts_with("NOSCRIPT") => {
                args[0] = b"EVAL";
                args[1] = ROUND_SCRIPT.as_bytes();
                c.call(&args).await?
            }
            other => other?,
        };
        let Reply::Array(items) = reply else {
            return Err(RedisError::Protocol("the round answered no array"));
        };
        let numbers: Vec<i64> = items
            .into_iter()
            .map(|item| match item {
                Reply::Int(n) => Ok(n),
                _ => Err(RedisError::Protocol("the round answered a non-integer")),
            })
            .collect::<Result<_, _>>()?;
        if numbers.len() != 1 + 2 * work.limits.len() + 2 * work.quotas.len() {
            return Err(RedisError::Protocol("the round answered the wrong count"));
        }
        Ok(numbers)
    }

    /// `recovering`: Redis came back within the last heartbeats' lifetime,
    /// empty, and the others have not all written theirs yet: N does not fall
    /// below what it was.
    fn apply(&self, work: &Work, reply: &[i64], recovering: bool) {
        let seen = u32::try_from(reply[0].max(1)).unwrap_or(u32::MAX);
        let gateways = if recovering {
            seen.max(self.gateways())
        } else {
            seen
        };
        self.gateways.store(gateways, Ordering::Relaxed);
        let mut at = 1;
        for claim in &work.limits {
            let (grant, used) = (reply[at].max(0) as u64, reply[at + 1].max(0) as u64);
            at += 2;
            if let Some(entry) = self.entries.get(&(claim.limit, claim.id)) {
                let mut st = Self::lock(&entry);
                if st.window == claim.window {
                    st.lease += grant;
                    st.used = st.used.max(used);
                }
            }
        }
        for quota in &work.quotas {
            let (requests, tokens) = (reply[at].max(0) as u64, reply[at + 1].max(0) as u64);
            at += 2;
            quota
                .counter
                .reported(quota.requests, quota.tokens, requests, tokens);
        }
    }

    /// A round that failed before Redis ran it: its debts go back, to be
    /// added by the next.
    fn restore(&self, work: &Work) {
        for claim in &work.limits {
            if let Some(entry) = self.entries.get(&(claim.limit, claim.id)) {
                let mut st = Self::lock(&entry);
                if st.window == claim.window {
                    st.debt += claim.debt;
                }
            }
        }
    }

    fn prune(&self, now_ms: i64) {
        self.entries.retain(|_, entry| {
            // A request holds it: not idle.
            if Arc::strong_count(entry) > 1 {
                return true;
            }
            let st = Self::lock(entry);
            st.window_ms == 0
                || now_ms.div_euclid(st.window_ms) - st.window < IDLE_WINDOWS
                || st.want > 0
        });
    }
}

impl RateLimit {
    fn key_word(self) -> &'static str {
        match self {
            RateLimit::Tenant => "tenant",
            RateLimit::Key => "key",
            RateLimit::Visitor => "visitor",
            RateLimit::Address => "address",
        }
    }
}

#[derive(Default)]
struct Work {
    limits: Vec<Claim>,
    quotas: Vec<QuotaReport>,
    /// More was waiting than one round takes.
    full: bool,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.quotas.is_empty()
    }
}

struct Claim {
    limit: RateLimit,
    id: Uuid,
    window: i64,
    count: u64,
    window_ms: i64,
    /// Asked of Redis.
    want: u64,
    debt: u64,
}

struct QuotaReport {
    config: Uuid,
    counted_at_ms: i64,
    /// What this gateway served since the count, in all.
    requests: u64,
    tokens: u64,
    counter: Arc<crate::ratelimit::QuotaCounter>,
}

/// Several gateways' shared limits in one process, each with its own
/// [`Limits`], their rounds on one background runtime as in `agora proxy`:
/// what this module's tests and its benchmark run.
pub struct InProcess {
    pub gateways: Vec<(Arc<Global>, Arc<Limits>)>,
    _stop: tokio::sync::watch::Sender<bool>,
    background: Option<tokio::runtime::Runtime>,
}

impl InProcess {
    /// `n` gateways on the Redis at `url`, under a key prefix of their own,
    /// with the default timeout and interval.
    pub fn start(url: &str, n: usize) -> InProcess {
        let prefix = format!("t{}", Uuid::new_v4().simple());
        let (stop, rx) = tokio::sync::watch::channel(false);
        let background = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a background runtime");
        let gateways = (0..n)
            .map(|_| {
                let global = Global::new(GlobalConfig {
                    url: RedisUrl::parse(url).expect("a Redis URL"),
                    timeout: Duration::from_millis(25),
                    interval: Duration::from_millis(20),
                    key_prefix: prefix.clone(),
                });
                let limits = Arc::new(Limits::new(1_000_000, 1_000_000));
                background.spawn(global.clone().run(limits.clone(), rx.clone()));
                (global, limits)
            })
            .collect();
        InProcess {
            gateways,
            _stop: stop,
            background: Some(background),
        }
    }

    /// Waits until every gateway decides through Redis and counts `n` alive.
    pub async fn all_see(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .gateways
            .iter()
            .all(|(g, _)| g.mode() == Mode::Global && g.gateways() == n)
        {
            assert!(
                Instant::now() < deadline,
                "the gateways never saw each other"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(rt) = self.background.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_testkit::{eventually_within, LocalRedis};

    type Gateways = InProcess;

    fn gateways(redis: &LocalRedis, n: usize) -> Gateways {
        InProcess::start(&redis.url(), n)
    }

    /// Requests from `workers` concurrent clients, each to a gateway picked at
    /// random, for `run`: the admitted ones, by the window they were decided in.
    async fn blast(
        gws: &Gateways,
        limit: RateLimit,
        id: Uuid,
        count: u64,
        window_ms: i64,
        workers: usize,
        run: Duration,
    ) -> std::collections::BTreeMap<i64, u64> {
        let until = Instant::now() + run;
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let gws: Vec<Arc<Global>> = gws.gateways.iter().map(|(g, _)| g.clone()).collect();
                tokio::spawn(async move {
                    let mut admitted = std::collections::BTreeMap::new();
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                    while Instant::now() < until {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let g = &gws[(x % gws.len() as u64) as usize];
                        let now = crate::sync::now_ms();
                        if let Ok(window) = g
                            .admit(limit, id, count, window_ms, now, g.deadline())
                            .await
                        {
                            *admitted.entry(window).or_insert(0) += 1;
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut total = std::collections::BTreeMap::new();
        for task in tasks {
            for (window, n) in task.await.unwrap() {
                *total.entry(window).or_insert(0) += n;
            }
        }
        total
    }

    /// Waits, if need be, so that `run` fits in one window of `window_ms`.
    async fn inside_one_window(window_ms: i64, run: Duration) {
        let now = crate::sync::now_ms();
        let left = window_ms - now.rem_euclid(window_ms);
        if left < run.as_millis() as i64 + 2_000 {
            tokio::time::sleep(Duration::from_millis(left as u64 + 50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_gateways_together_admit_a_minute_limit_and_no_more() {
        let redis = LocalRedis::start();
        let gws = gateways(&redis, 3);
        gws.all_see(3).await;
        let run = Duration::from_secs(2);
        inside_one_window(60_000, run).await;
        let admitted = blast(&gws, RateLimit::Key, Uuid::new_v4(), 1_000, 60_000, 24, run).await;
        let total: u64 = admitted.values().sum();
        eprintln!("admitted {total} of 1000 in one 60 s window over 3 gateways");
        assert_eq!(admitted.len(), 1, "one window: {admitted:?}");
        assert!(total <= 1_000, "never more than the limit: {total}");
        assert!(total >= 990, "within 1% of the limit: {total}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_gateways_together_admit_a_second_limit_in_every_second() {
        let redis = LocalRedis::start();
        let gws = gateways(&redis, 3);
        gws.all_see(3).await;
        let admitted = blast(
            &gws,
            RateLimit::Tenant,
            Uuid::new_v4(),
            300,
            1_000,
            24,
            Duration::from_millis(4_500),
        )
        .await;
        let timeouts: u64 = gws
            .gateways
            .iter()
            .map(|(g, _)| g.stats.wait_timeouts.load(Ordering::Relaxed))
            .sum();
        let waits: u64 = gws
            .gateways
            .iter()
            .map(|(g, _)| g.stats.waits.load(Ordering::Relaxed))
            .sum();
        eprintln!("admitted per 1 s window of 300 over 3 gateways: {admitted:?}; {waits} waits, {timeouts} timed out");
        let windows: Vec<_> = admitted.iter().collect();
        assert!(windows.len() >= 4, "{admitted:?}");
        // Past the limit only by requests decided on a share after waiting
        // longer than the timeout (the documented bound).
        for (window, n) in &admitted {
            assert!(*n <= 300 + timeouts, "window {window}: {n} over the limit");
        }
        // The windows wholly inside the run: all but the first and the last.
        for (window, n) in &windows[1..windows.len() - 1] {
            assert!(
                **n >= 297,
                "window {window}: {n}, not within 1% of 300 ({admitted:?})"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_used_up_window_is_refused_until_its_end_on_every_gateway() {
        let redis = LocalRedis::start();
        let gws = gateways(&redis, 2);
        gws.all_see(2).await;
        inside_one_window(60_000, Duration::from_secs(1)).await;
        let id = Uuid::new_v4();
        let (a, b) = (&gws.gateways[0].0, &gws.gateways[1].0);
        let now = crate::sync::now_ms();
        for _ in 0..10 {
            a.admit(RateLimit::Key, id, 10, 60_000, now, a.deadline())
                .await
                .unwrap();
        }
        let refusal = b
            .admit(RateLimit::Key, id, 10, 60_000, now, b.deadline())
            .await
            .unwrap_err();
        match refusal {
            GatewayError::RateLimited {
                limit,
                retry_after_secs,
                headers,
            } => {
                assert_eq!(limit, RateLimit::Key);
                let end = (now.div_euclid(60_000) + 1) * 60_000;
                assert_eq!(retry_after_secs, ((end - now) as u64).div_ceil(1000));
                assert_eq!((headers.limit, headers.remaining), (10, 0));
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        // Another id has its own count.
        b.admit(
            RateLimit::Key,
            Uuid::new_v4(),
            10,
            60_000,
            now,
            b.deadline(),
        )
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_redis_each_gateway_holds_its_share_and_returns_when_redis_does() {
        let mut redis = LocalRedis::start();
        let gws = gateways(&redis, 3);
        gws.all_see(3).await;
        inside_one_window(60_000, Duration::from_secs(4)).await;
        redis.kill();
        for (g, _) in &gws.gateways {
            eventually_within(Duration::from_secs(2), "the gateway notices", || async {
                // A request notices when its round fails.
                let _ = g
                    .admit(
                        RateLimit::Key,
                        Uuid::new_v4(),
                        10,
                        60_000,
                        crate::sync::now_ms(),
                        g.deadline(),
                    )
                    .await;
                (g.mode() == Mode::LocalShare).then_some(())
            })
            .await;
            assert_eq!(g.gateways(), 3, "N stays what the last heartbeat said");
        }
        // Each gateway admits ceil(100 / 3) = 34 of a new key's 100.
        let id = Uuid::new_v4();
        let now = crate::sync::now_ms();
        for (g, _) in &gws.gateways {
            let mut admitted = 0;
            for _ in 0..50 {
                if g.admit(RateLimit::Key, id, 100, 60_000, now, g.deadline())
                    .await
                    .is_ok()
                {
                    admitted += 1;
                }
            }
            assert_eq!(admitted, 34);
        }
        redis.resume();
        for (g, _) in &gws.gateways {
            eventually_within(
                Duration::from_secs(2),
                "back to the shared count",
                || async { (g.mode() == Mode::Global).then_some(()) },
            )
            .await;
        }
        // What was admitted on the shares is in the shared count now: 102 of
        // 100 used, so the window is refused everywhere.
        let (g, _) = &gws.gateways[0];
        eventually_within(Duration::from_secs(2), "the shares are counted", || async {
            g.admit(
                RateLimit::Key,
                id,
                100,
                60_000,
                crate::sync::now_ms(),
                g.deadline(),
            )
            .await
            .is_err()
            .then_some(())
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quota_use_on_one_gateway_counts_on_the_others() {
        use agora_config::keys::{KeyKind, Mode as KeyMode, Scope};
        use agora_config::snapshot::{
            BillingInterval, KeyEntry, KeyStatus, PlanLimits, QuotaUsage,
        };
        let redis = LocalRedis::start();
        let gws = gateways(&redis, 2);
        gws.all_see(2).await;
        let key = KeyEntry {
            key_id: Uuid::new_v4(),
            kind: KeyKind::SecretLive,
            config: Uuid::new_v4(),
            tenant: Uuid::new_v4(),
            project: None,
            scopes: vec![Scope::Invoke],
            status: KeyStatus::Active,
            plan: None,
            mode: KeyMode::Live,
            expires_at: None,
        };
        let plan = PlanLimits {
            plan: Uuid::new_v4(),
            requests_per_minute: None,
            burst: None,
            max_concurrency: None,
            request_quota: Some(5),
            token_quota: None,
            interval: BillingInterval::Month,
        };
        let now = crate::sync::now_ms();
        let quota = QuotaUsage {
            period_start_ms: now - 1_000,
            period_end_ms: now + 3_600_000,
            counted_at_ms: now - 500,
            requests: 0,
            tokens: 0,
        };
        let (a, b) = (&gws.gateways[0].1, &gws.gateways[1].1);
        for _ in 0..5 {
            a.admit(&key, Some(&plan), &quota, now, 2).unwrap().count();
        }
        // The other gateway's own count is 0; it refuses once it has read A's.
        let _ = b.admit(&key, Some(&plan), &quota, now, 2).unwrap();
        eventually_within(Duration::from_secs(3), "B refuses on the total", || async {
            matches!(
                b.admit(&key, Some(&plan), &quota, now, 2),
                Err(GatewayError::QuotaExceeded { .. })
            )
            .then_some(())
        })
        .await;
    }
}
