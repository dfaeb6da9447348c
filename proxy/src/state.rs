//! The in-memory form of a snapshot that the request path reads: hash maps keyed
//! the way requests look things up, upstream peers resolved once per revision, and
//! the verified claims of each key cached beside its entry.
//!
//! A [`State`] is immutable; a new revision builds a new one and swaps it in whole,
//! so a request sees one revision from start to end.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agora_config::keys::{Claims, KeyHash, Verifier};
use agora_config::snapshot::{AgentRoute, KeyEntry, PlanLimits, Snapshot, WidgetSettings};
use http::{HeaderName, HeaderValue};
use pingora::upstreams::peer::{HttpPeer, Peer};
use uuid::Uuid;

/// Timeouts given to every upstream peer.
#[derive(Clone, Copy, Debug)]
pub struct PeerTimeouts {
    pub connect: Duration,
    pub read: Duration,
}

/// One key of the snapshot's key table, with its claims once verified.
pub struct KeyRecord {
    pub entry: KeyEntry,
    /// Filled by the first successful EdDSA verification of this exact key string
    /// (the table is keyed by the SHA-256 of the whole string). Failures are not
    /// cached: they re-verify, and they only happen for a key whose hash is in the
    /// table, i.e. its holder has the real key.
    pub verified: OnceLock<Arc<Claims>>,
}

/// Where a customer agent config's invokes go.
pub struct RouteTarget {
    pub route: AgentRoute,
    /// `None` when the runtime URL could not be resolved; invokes get 503.
    pub peer: Option<HttpPeer>,
    /// `host[:port]` for the upstream `Host` header.
    pub authority: String,
    /// `/api/v1/run/{flow_id}` (after the runtime URL's base path), and the same
    /// with `?stream=true`: the upstream request targets.
    pub run_uri: String,
    pub stream_uri: String,
    /// Which idle runtime connections this route may reuse (same address, TLS and
    /// server name).
    pub pool_key: u64,
    /// Longest wait for each read from the runtime, and for a new connection.
    pub timeouts: PeerTimeouts,
    /// `X-LANGFLOW-GLOBAL-VAR-*` headers carrying the buyer's settings.
    pub global_vars: Vec<(HeaderName, HeaderValue)>,
}

pub struct State {
    snapshot: Snapshot,
    verifier: Option<Verifier>,
    keys: HashMap<KeyHash, Arc<KeyRecord>>,
    /// Publishable keys by key id: what a widget visitor's session names.
    publishable: HashMap<Uuid, Arc<KeyRecord>>,
    routes: HashMap<Uuid, Arc<RouteTarget>>,
    plans: HashMap<Uuid, PlanLimits>,
    widgets: HashMap<Uuid, WidgetSettings>,
    /// Every origin some widget may be embedded on (preflights name no key).
    widget_origins: HashSet<String>,
}

impl State {
    /// No configuration: every key is refused.
    pub fn empty() -> State {
        State {
            snapshot: Snapshot::empty(),
            verifier: None,
            keys: HashMap::new(),
            publishable: HashMap::new(),
            routes: HashMap::new(),
            plans: HashMap::new(),
            widgets: HashMap::new(),
            widget_origins: HashSet::new(),
        }
    }

    /// Builds the request-path form of `snapshot`. Verified claims carry over from
    /// `previous` for keys whose entry is unchanged while the trusted verification
    /// keys are the same.
    pub fn build(snapshot: Snapshot, previous: &State, timeouts: PeerTimeouts) -> State {
        let verifier = match Verifier::new(&snapshot.verification_keys) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error = %e, revision = snapshot.revision, "snapshot verification keys refused; every key will be refused");
                None
            }
        };
        let same_trust = previous.snapshot.verification_keys == snapshot.verification_keys;
        let keys: HashMap<KeyHash, Arc<KeyRecord>> = snapshot
            .keys
            .iter()
            .map(|(hash, entry)| {
                let record = match previous.keys.get(hash) {
                    Some(old) if same_trust && old.entry == *entry => old.clone(),
                    _ => Arc::new(KeyRecord {
                        entry: entry.clone(),
                        verified: OnceLock::new(),
                    }),
                };
                (*hash, record)
            })
            .collect();
        let routes = snapshot
            .routes
            .iter()
            .map(|(config, route)| {
                let target = match previous.routes.get(config) {
                    Some(old) if old.route == *route && old.peer.is_some() => old.clone(),
                    _ => Arc::new(RouteTarget::new(route.clone(), timeouts)),
                };
                (*config, target)
            })
            .collect();
        let publishable = keys
            .values()
            .filter(|r| r.entry.kind.is_publishable())
            .map(|r| (r.entry.key_id, r.clone()))
            .collect();
        let widget_origins = snapshot
            .widgets
            .values()
            .flat_map(|w| w.allowed_origins.iter().cloned())
            .collect();
        State {
            publishable,
            widget_origins,
            plans: snapshot
                .plans
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            widgets: snapshot
                .widgets
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            keys,
            routes,
            verifier,
            snapshot,
        }
    }

    pub fn revision(&self) -> u64 {
        self.snapshot.revision
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn verifier(&self) -> Option<&Verifier> {
        self.verifier.as_ref()
    }

    pub fn key(&self, hash: &KeyHash) -> Option<&Arc<KeyRecord>> {
        self.keys.get(hash)
    }

    pub fn route(&self, config: &Uuid) -> Option<&Arc<RouteTarget>> {
        self.routes.get(config)
    }

    pub fn plan(&self, plan: &Uuid) -> Option<&PlanLimits> {
        self.plans.get(plan)
    }

    pub fn widget(&self, config: &Uuid) -> Option<&WidgetSettings> {
        self.widgets.get(config)
    }

    /// The publishable key with this id.
    pub fn publishable_key(&self, key_id: &Uuid) -> Option<&Arc<KeyRecord>> {
        self.publishable.get(key_id)
    }

    /// Whether any widget may be embedded on `origin`.
    pub fn is_widget_origin(&self, origin: &str) -> bool {
        self.widget_origins.contains(origin)
    }

    /// Keys in the table (for health).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

impl RouteTarget {
    pub fn new(route: AgentRoute, timeouts: PeerTimeouts) -> RouteTarget {
        let (peer, authority, base) = match resolve(&route.runtime_url) {
            Ok((addr, tls, host, authority, base)) => {
                let mut peer = HttpPeer::new(addr, tls, host);
                peer.options.connection_timeout = Some(timeouts.connect);
                peer.options.total_connection_timeout = Some(timeouts.connect);
                peer.options.read_timeout = Some(timeouts.read);
                peer.options.write_timeout = Some(timeouts.read);
                peer.options.idle_timeout = Some(Duration::from_secs(60));
                (Some(peer), authority, base)
            }
            Err(why) => {
                tracing::error!(config = %route.config, why, "runtime URL of route cannot be used");
                (None, String::new(), String::new())
            }
        };
        let run_path = format!("{base}/api/v1/run/{}", route.flow_id);
        let uris = run_path
            .parse::<http::Uri>()
            .and_then(|run| Ok((run, format!("{run_path}?stream=true").parse::<http::Uri>()?)));
        let (peer, run_uri, stream_uri) = match uris {
            Ok((run, stream)) => (peer, run.to_string(), stream.to_string()),
            Err(_) => {
                // Never run some other target: the route is unusable (503).
                tracing::error!(config = %route.config, "flow id of route is not a valid path");
                (None, "/".to_owned(), "/".to_owned())
            }
        };
        let pool_key = peer.as_ref().map_or(0, |p| p.reuse_hash());
        let global_vars = route
            .global_vars
            .iter()
            .filter_map(|(name, value)| {
                let name =
                    HeaderName::try_from(format!("x-langflow-global-var-{name}").to_lowercase())
                        .ok()?;
                // Header values cannot hold line breaks or other controls.
                let clean: String = value
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                let value = HeaderValue::from_bytes(clean.trim().as_bytes()).ok()?;
                Some((name, value))
            })
            .collect();
        RouteTarget {
            route,
            peer,
            authority,
            run_uri,
            stream_uri,
            pool_key,
            timeouts,
            global_vars,
        }
    }
}

/// `http(s)://host[:port][/base]` → (address, tls, host, authority, base path).
fn resolve(url: &str) -> Result<(SocketAddr, bool, String, String, String), &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "not a URL")?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("scheme must be http or https"),
    };
    let host = uri.host().ok_or("no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = (host.trim_matches(|c| c == '[' || c == ']'), port)
        .to_socket_addrs()
        .map_err(|_| "host does not resolve")?
        .next()
        .ok_or("host does not resolve")?;
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let base = uri.path().trim_end_matches('/').to_owned();
    Ok((addr, tls, host, authority, base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_runtime_urls() {
        let (addr, tls, host, authority, base) = resolve("http://127.0.0.1:7860").unwrap();
        assert_eq!(addr, "127.0.0.1:7860".parse().unwrap());
        assert!(!tls);
        assert_eq!(host, "127.0.0.1");
        assert_eq!(authority, "127.0.0.1:7860");
        assert_eq!(base, "");
        let (addr, tls, _, _, base) = resolve("https://127.0.0.1/langflow/").unwrap();
        assert_eq!(addr.port(), 443);
        assert!(tls);
        assert_eq!(base, "/langflow");
        assert!(resolve("ftp://x").is_err());
        assert!(resolve("http://no-such-host.invalid:1").is_err());
    }
}
