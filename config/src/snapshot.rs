//! The data-plane configuration contract between the control plane and the proxy.
//!
//! # Protocol
//!
//! The control plane owns the truth (keys, subscriptions, agents, plans, widgets) and
//! compiles it into a [`Snapshot`]: everything the proxy needs to serve requests, and
//! nothing else. Every change to that truth produces a new snapshot with a strictly
//! greater `revision`.
//!
//! - `GET /internal/v1/snapshot` returns the full current snapshot.
//! - `GET /internal/v1/changes?since=REV` long-polls: it answers as soon as the revision
//!   moves past `REV` (or when the poll times out) with a [`Delta`] from `REV` to the
//!   current revision.
//!
//! Both are authenticated with a shared proxy secret.
//!
//! The proxy serves the hot path from its in-memory snapshot alone. It persists the last
//! snapshot it applied and starts from it, so it keeps serving with the last known
//! configuration while the control plane is away (static stability).
//!
//! [`Snapshot::apply`] refuses a delta whose `from_revision` is not the proxy's current
//! revision, or that does not move the revision forward, and leaves the snapshot
//! unchanged; the proxy then refetches the full snapshot. A delta is therefore applied
//! whole or not at all, and revisions never go backwards.
//!
//! These types cross versions of the two planes: unknown members are ignored and
//! missing collections read as empty, but the types of known members are strict.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::keys::{KeyHash, KeyKind, Mode, Scope, VerificationKey};

/// Everything the proxy needs, at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Strictly increases with every change.
    pub revision: u64,
    /// When the control plane compiled this revision, unix milliseconds.
    pub generated_at_ms: i64,
    /// Public keys trusted to have signed API keys (several during a rotation).
    #[serde(default)]
    pub verification_keys: Vec<VerificationKey>,
    /// Key table, by SHA-256 of the whole key string.
    #[serde(default)]
    pub keys: BTreeMap<KeyHash, KeyEntry>,
    /// Agent routes, by customer agent config uuid.
    #[serde(default)]
    pub routes: BTreeMap<Uuid, AgentRoute>,
    /// Plan limits, by plan uuid.
    #[serde(default)]
    pub plans: BTreeMap<Uuid, PlanLimits>,
    /// Widget settings, by customer agent config uuid.
    #[serde(default)]
    pub widgets: BTreeMap<Uuid, WidgetSettings>,
}

/// Whether a key may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    /// Revoked by its owner; never comes back.
    Revoked,
    /// Temporarily unusable, e.g. the subscription behind it is unpaid.
    Suspended,
}

impl KeyStatus {
    /// As stored and shown: `active`, `revoked` or `suspended`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Suspended => "suspended",
        }
    }
}

/// One row of the key table. Holds no key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub key_id: Uuid,
    pub kind: KeyKind,
    /// Customer agent config the key calls.
    pub config: Uuid,
    pub tenant: Uuid,
    pub project: Option<Uuid>,
    pub scopes: Vec<Scope>,
    pub status: KeyStatus,
    /// Plan whose limits apply; `None` for no plan limits.
    pub plan: Option<Uuid>,
    pub mode: Mode,
    /// Unix seconds; `None` for a key that does not expire.
    pub expires_at: Option<i64>,
}

/// Where and how to run a customer's agent config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRoute {
    /// Customer agent config uuid.
    pub config: Uuid,
    /// The provider's agent the config customises.
    pub agent: Uuid,
    /// Tenant owning the config.
    pub tenant: Uuid,
    /// Base URL of the agent runtime.
    pub runtime_url: String,
    /// Flow to run (`POST {runtime_url}/api/v1/run/{flow_id}`).
    pub flow_id: String,
    /// Tweaks sent with every run, built from the config (name, greeting, tone,
    /// knowledge base).
    #[serde(default)]
    pub tweaks: serde_json::Map<String, serde_json::Value>,
    /// Global variables for the flow, e.g. `AGENT_NAME`, `GREETING`, `TONE`.
    #[serde(default)]
    pub global_vars: BTreeMap<String, String>,
    /// What the subscription has used of its plan's quotas this period, as the
    /// control plane last counted it.
    #[serde(default)]
    pub quota: QuotaUsage,
}

/// A subscription's use of its plan's quotas in the current billing period, as the
/// control plane counted it when it compiled the snapshot.
///
/// The proxy enforces quotas from this count plus what it has served itself since
/// `counted_at_ms`. All zero means nothing was counted yet (a new subscription, or
/// no usage store); `period_end_ms` of 0 means the period's end is not known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct QuotaUsage {
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    /// When the counts below were taken.
    pub counted_at_ms: i64,
    pub requests: u64,
    pub tokens: u64,
}

/// Billing period of a plan (its price and its quotas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BillingInterval {
    Month,
    Year,
}

impl BillingInterval {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingInterval::Month => "month",
            BillingInterval::Year => "year",
        }
    }
}

impl std::str::FromStr for BillingInterval {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "month" => Ok(BillingInterval::Month),
            "year" => Ok(BillingInterval::Year),
            other => Err(format!("{other:?} is not one of month, year")),
        }
    }
}

/// Limits of a pricing plan. `None` means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanLimits {
    pub plan: Uuid,
    pub requests_per_minute: Option<u32>,
    pub burst: Option<u32>,
    pub max_concurrency: Option<u32>,
    /// Requests per billing interval.
    pub request_quota: Option<u64>,
    /// Tokens (input + output) per billing interval.
    pub token_quota: Option<u64>,
    pub interval: BillingInterval,
}

/// Settings of a config's embeddable widget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WidgetSettings {
    /// Origins (exact `scheme://host[:port]`) allowed to use the config's
    /// publishable keys: the config's own list and each active key's.
    pub allowed_origins: Vec<String>,
    pub title: String,
    /// Shown before the visitor's first message.
    pub greeting: String,
    /// `#rrggbb`.
    pub accent_color: String,
    /// `bottom-right` or `bottom-left`.
    pub position: String,
    /// The launcher button's text.
    #[serde(default)]
    pub launcher_text: String,
}

/// The changes from one revision to a later one.
///
/// `upsert_*` entries replace or add whole entries; `remove_*` entries are dropped
/// (removing an absent entry is not an error). An id may not be both upserted and
/// removed. `verification_keys`, when present, replaces the whole list.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Delta {
    pub from_revision: u64,
    pub to_revision: u64,
    /// `generated_at_ms` of the target revision.
    pub generated_at_ms: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upsert_keys: BTreeMap<KeyHash, KeyEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_keys: Vec<KeyHash>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upsert_routes: BTreeMap<Uuid, AgentRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_routes: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upsert_plans: BTreeMap<Uuid, PlanLimits>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_plans: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upsert_widgets: BTreeMap<Uuid, WidgetSettings>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_widgets: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_keys: Option<Vec<VerificationKey>>,
}

impl Delta {
    /// Whether the delta changes no entry (it may still move the revision).
    pub fn is_empty(&self) -> bool {
        self.upsert_keys.is_empty()
            && self.remove_keys.is_empty()
            && self.upsert_routes.is_empty()
            && self.remove_routes.is_empty()
            && self.upsert_plans.is_empty()
            && self.remove_plans.is_empty()
            && self.upsert_widgets.is_empty()
            && self.remove_widgets.is_empty()
            && self.verification_keys.is_none()
    }
}

/// Why a delta was refused. The snapshot is left unchanged; refetch the full one.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("delta starts at revision {from_revision}, snapshot is at revision {current}")]
    RevisionMismatch { current: u64, from_revision: u64 },
    #[error("delta from revision {from_revision} to {to_revision} does not move forward")]
    RevisionNotIncreasing {
        from_revision: u64,
        to_revision: u64,
    },
    #[error("delta both upserts and removes one entry")]
    ConflictingDelta,
}

impl SnapshotError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            SnapshotError::RevisionMismatch { .. } => "snapshot_revision_mismatch",
            SnapshotError::RevisionNotIncreasing { .. } => "snapshot_revision_not_increasing",
            SnapshotError::ConflictingDelta => "conflicting_delta",
        }
    }
}

impl Snapshot {
    /// Revision 0, with nothing in it: what a proxy starts from with no persisted snapshot.
    pub fn empty() -> Self {
        Snapshot {
            revision: 0,
            generated_at_ms: 0,
            verification_keys: Vec::new(),
            keys: BTreeMap::new(),
            routes: BTreeMap::new(),
            plans: BTreeMap::new(),
            widgets: BTreeMap::new(),
        }
    }

    /// Applies `delta`, all or nothing.
    ///
    /// Refuses, leaving `self` unchanged, a delta whose `from_revision` is not
    /// `self.revision` ([`SnapshotError::RevisionMismatch`]), whose `to_revision` is
    /// lower than its `from_revision`, or equal to it while changing something
    /// ([`SnapshotError::RevisionNotIncreasing`]), or that both upserts and removes one
    /// entry ([`SnapshotError::ConflictingDelta`]).
    pub fn apply(&mut self, delta: &Delta) -> Result<(), SnapshotError> {
        if delta.from_revision != self.revision {
            return Err(SnapshotError::RevisionMismatch {
                current: self.revision,
                from_revision: delta.from_revision,
            });
        }
        if delta.to_revision < delta.from_revision
            || (delta.to_revision == delta.from_revision && !delta.is_empty())
        {
            return Err(SnapshotError::RevisionNotIncreasing {
                from_revision: delta.from_revision,
                to_revision: delta.to_revision,
            });
        }
        if overlaps(&delta.upsert_keys, &delta.remove_keys)
            || overlaps(&delta.upsert_routes, &delta.remove_routes)
            || overlaps(&delta.upsert_plans, &delta.remove_plans)
            || overlaps(&delta.upsert_widgets, &delta.remove_widgets)
        {
            return Err(SnapshotError::ConflictingDelta);
        }

        // Nothing below can fail.
        merge(&mut self.keys, &delta.upsert_keys, &delta.remove_keys);
        merge(&mut self.routes, &delta.upsert_routes, &delta.remove_routes);
        merge(&mut self.plans, &delta.upsert_plans, &delta.remove_plans);
        merge(
            &mut self.widgets,
            &delta.upsert_widgets,
            &delta.remove_widgets,
        );
        if let Some(keys) = &delta.verification_keys {
            self.verification_keys.clone_from(keys);
        }
        self.revision = delta.to_revision;
        self.generated_at_ms = delta.generated_at_ms;
        Ok(())
    }

    /// The delta that turns `old` into `new`: `old.apply(&Snapshot::diff(old, new))`
    /// leaves `old` equal to `new` whenever `new.revision` is greater than
    /// `old.revision` (or equal, with identical contents).
    pub fn diff(old: &Snapshot, new: &Snapshot) -> Delta {
        let (upsert_keys, remove_keys) = diff_maps(&old.keys, &new.keys);
        let (upsert_routes, remove_routes) = diff_maps(&old.routes, &new.routes);
        let (upsert_plans, remove_plans) = diff_maps(&old.plans, &new.plans);
        let (upsert_widgets, remove_widgets) = diff_maps(&old.widgets, &new.widgets);
        let verification_keys =
            (old.verification_keys != new.verification_keys).then(|| new.verification_keys.clone());
        Delta {
            from_revision: old.revision,
            to_revision: new.revision,
            generated_at_ms: new.generated_at_ms,
            upsert_keys,
            remove_keys,
            upsert_routes,
            remove_routes,
            upsert_plans,
            remove_plans,
            upsert_widgets,
            remove_widgets,
            verification_keys,
        }
    }
}

/// The answer to `GET /internal/v1/changes?since=REV`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Changes {
    /// Nothing changed before the long poll timed out.
    Unchanged { revision: u64 },
    /// What changed since `since`: apply it to the snapshot at that revision.
    Delta { delta: Delta },
    /// The whole snapshot, when no delta from `since` can be made (the
    /// server does not hold that revision, or `since` is ahead of it).
    Full { snapshot: Snapshot },
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot::empty()
    }
}

fn overlaps<K: Ord, V>(upserts: &BTreeMap<K, V>, removes: &[K]) -> bool {
    removes.iter().any(|k| upserts.contains_key(k))
}

fn merge<K: Ord + Clone, V: Clone>(
    target: &mut BTreeMap<K, V>,
    upserts: &BTreeMap<K, V>,
    removes: &[K],
) {
    for k in removes {
        target.remove(k);
    }
    for (k, v) in upserts {
        target.insert(k.clone(), v.clone());
    }
}

fn diff_maps<K: Ord + Clone, V: Clone + PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> (BTreeMap<K, V>, Vec<K>) {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let new_keys: BTreeSet<&K> = new.keys().collect();
    let removes = old
        .keys()
        .filter(|k| !new_keys.contains(k))
        .cloned()
        .collect();
    (upserts, removes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn uuid(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn hash(n: u8) -> KeyHash {
        KeyHash::from_bytes([n; 32])
    }

    fn key_entry(n: u128, status: KeyStatus) -> KeyEntry {
        KeyEntry {
            key_id: uuid(n),
            kind: KeyKind::SecretLive,
            config: uuid(100),
            tenant: uuid(200),
            project: None,
            scopes: vec![Scope::Invoke, Scope::Read],
            status,
            plan: Some(uuid(300)),
            mode: Mode::Live,
            expires_at: Some(1_800_000_000),
        }
    }

    fn route(config: u128) -> AgentRoute {
        let mut tweaks = serde_json::Map::new();
        tweaks.insert("Prompt-abc12".into(), json!({"template": "You are Ada."}));
        AgentRoute {
            config: uuid(config),
            agent: uuid(400),
            tenant: uuid(200),
            runtime_url: "http://127.0.0.1:7860".into(),
            flow_id: "6f1c2e0a-flow".into(),
            tweaks,
            global_vars: BTreeMap::from([
                ("AGENT_NAME".into(), "Ada".into()),
                ("GREETING".into(), "Hello!".into()),
                ("TONE".into(), "friendly".into()),
            ]),
            quota: QuotaUsage::default(),
        }
    }

    fn plan(n: u128) -> PlanLimits {
        PlanLimits {
            plan: uuid(n),
            requests_per_minute: Some(60),
            burst: Some(10),
            max_concurrency: Some(4),
            request_quota: Some(10_000),
            token_quota: None,
            interval: BillingInterval::Month,
        }
    }

    fn widget() -> WidgetSettings {
        WidgetSettings {
            allowed_origins: vec!["https://shop.example".into()],
            title: "Ada".into(),
            greeting: "Hello!".into(),
            accent_color: "#3355ff".into(),
            launcher_text: "Chat".into(),
            position: "bottom-right".into(),
        }
    }

    fn sample() -> Snapshot {
        Snapshot {
            revision: 7,
            generated_at_ms: 1_700_000_000_000,
            verification_keys: vec![VerificationKey {
                kid: "k1".into(),
                public_key: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
            }],
            keys: BTreeMap::from([
                (hash(1), key_entry(1, KeyStatus::Active)),
                (hash(2), key_entry(2, KeyStatus::Suspended)),
            ]),
            routes: BTreeMap::from([(uuid(100), route(100))]),
            plans: BTreeMap::from([(uuid(300), plan(300))]),
            widgets: BTreeMap::from([(uuid(100), widget())]),
        }
    }

    #[test]
    fn json_round_trip() {
        let snapshot = sample();
        let text = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), snapshot);

        let value = serde_json::to_value(&snapshot).unwrap();
        let key_table = value["keys"].as_object().unwrap();
        assert!(key_table.contains_key(&hash(1).to_hex()));
        assert_eq!(key_table[&hash(2).to_hex()]["status"], "suspended");
        assert_eq!(key_table[&hash(2).to_hex()]["kind"], "secret_live");
        assert_eq!(value["plans"][uuid(300).to_string()]["interval"], "month");

        let mut next = snapshot.clone();
        next.revision = 8;
        next.keys.remove(&hash(2));
        let delta = Snapshot::diff(&snapshot, &next);
        let text = serde_json::to_string(&delta).unwrap();
        assert_eq!(serde_json::from_str::<Delta>(&text).unwrap(), delta);
        assert_eq!(
            serde_json::to_value(&delta).unwrap(),
            json!({
                "from_revision": 7, "to_revision": 8, "generated_at_ms": 1_700_000_000_000i64,
                "remove_keys": [hash(2).to_hex()],
            })
        );
    }

    #[test]
    fn serde_is_lenient_on_unknown_members_and_strict_on_types() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["added_later"] = json!(true);
        value["plans"][uuid(300).to_string()]["added_later"] = json!(1);
        assert_eq!(serde_json::from_value::<Snapshot>(value).unwrap(), sample());

        let minimal: Snapshot =
            serde_json::from_value(json!({"revision": 3, "generated_at_ms": 5})).unwrap();
        assert_eq!(minimal.revision, 3);
        assert!(minimal.keys.is_empty());

        for bad in [
            json!({"revision": "3", "generated_at_ms": 5}),
            json!({"revision": -1, "generated_at_ms": 5}),
            json!({"generated_at_ms": 5}),
            json!({"revision": 3, "generated_at_ms": 5, "keys": {"ABC": {}}}),
        ] {
            assert!(serde_json::from_value::<Snapshot>(bad).is_err());
        }
        let mut value = serde_json::to_value(sample()).unwrap();
        value["keys"][hash(1).to_hex()]["status"] = json!("deleted");
        assert!(serde_json::from_value::<Snapshot>(value).is_err());
        let mut value = serde_json::to_value(sample()).unwrap();
        value["plans"][uuid(300).to_string()]["burst"] = json!("10");
        assert!(serde_json::from_value::<Snapshot>(value).is_err());
    }

    #[test]
    fn diff_then_apply_gives_the_new_snapshot() {
        let old = sample();
        let mut new = sample();
        new.revision = 9;
        new.generated_at_ms += 1_000;
        new.keys.insert(hash(1), key_entry(1, KeyStatus::Revoked));
        new.keys.remove(&hash(2));
        new.keys.insert(hash(3), key_entry(3, KeyStatus::Active));
        new.routes.get_mut(&uuid(100)).unwrap().flow_id = "other".into();
        new.plans.clear();
        new.widgets.insert(uuid(101), widget());
        new.verification_keys.push(VerificationKey {
            kid: "k2".into(),
            public_key: "x".into(),
        });

        let delta = Snapshot::diff(&old, &new);
        assert_eq!(delta.remove_keys, vec![hash(2)]);
        assert_eq!(delta.upsert_keys.len(), 2);
        assert_eq!(delta.remove_plans, vec![uuid(300)]);
        assert!(delta.upsert_widgets.contains_key(&uuid(101)));
        assert!(!delta.upsert_widgets.contains_key(&uuid(100)));
        let mut applied = old.clone();
        applied.apply(&delta).unwrap();
        assert_eq!(applied, new);

        let from_empty = Snapshot::diff(&Snapshot::empty(), &new);
        let mut applied = Snapshot::empty();
        applied.apply(&from_empty).unwrap();
        assert_eq!(applied, new);
    }

    #[test]
    fn apply_refuses_and_leaves_the_snapshot_unchanged() {
        let mut new = sample();
        new.revision = 8;
        new.keys.clear();
        let delta = Snapshot::diff(&sample(), &new);

        let mut ahead = sample();
        ahead.revision = 8;
        let before = ahead.clone();
        assert_eq!(
            ahead.apply(&delta),
            Err(SnapshotError::RevisionMismatch {
                current: 8,
                from_revision: 7
            })
        );
        assert_eq!(ahead, before);

        let mut current = sample();
        let backwards = Delta {
            from_revision: 7,
            to_revision: 6,
            ..Delta::default()
        };
        assert_eq!(
            current.apply(&backwards),
            Err(SnapshotError::RevisionNotIncreasing {
                from_revision: 7,
                to_revision: 6
            })
        );
        let same_revision_with_changes = Delta {
            from_revision: 7,
            to_revision: 7,
            remove_plans: vec![uuid(300)],
            ..Delta::default()
        };
        assert!(current.apply(&same_revision_with_changes).is_err());
        let conflicting = Delta {
            from_revision: 7,
            to_revision: 8,
            upsert_keys: BTreeMap::from([(hash(9), key_entry(9, KeyStatus::Active))]),
            remove_keys: vec![hash(9)],
            remove_plans: vec![uuid(300)],
            ..Delta::default()
        };
        assert_eq!(
            current.apply(&conflicting),
            Err(SnapshotError::ConflictingDelta)
        );
        assert_eq!(current, sample());

        // An empty delta at the same revision (a long poll that timed out) is a no-op.
        let nothing = Delta {
            from_revision: 7,
            to_revision: 7,
            generated_at_ms: current.generated_at_ms,
            ..Delta::default()
        };
        current.apply(&nothing).unwrap();
        assert_eq!(current, sample());
        for e in [
            SnapshotError::ConflictingDelta,
            SnapshotError::RevisionMismatch {
                current: 1,
                from_revision: 2,
            },
            SnapshotError::RevisionNotIncreasing {
                from_revision: 2,
                to_revision: 1,
            },
        ] {
            assert!(!e.code().is_empty() && !e.to_string().is_empty());
        }
    }

    fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
        let status = prop::sample::select(vec![
            KeyStatus::Active,
            KeyStatus::Revoked,
            KeyStatus::Suspended,
        ]);
        // Small id spaces, so that old and new snapshots share, change and drop entries.
        let keys = prop::collection::btree_map(
            (0u8..6).prop_map(hash),
            (0u128..3, status).prop_map(|(n, s)| key_entry(n, s)),
            0..5,
        );
        let routes = prop::collection::btree_map(
            (0u128..4).prop_map(uuid),
            (0u128..3, "[a-z]{0,3}").prop_map(|(n, flow)| AgentRoute {
                flow_id: flow,
                ..route(n)
            }),
            0..3,
        );
        let plans = prop::collection::btree_map(
            (0u128..4).prop_map(uuid),
            (0u128..3, prop::option::of(0u32..3))
                .prop_map(|(n, burst)| PlanLimits { burst, ..plan(n) }),
            0..3,
        );
        let widgets = prop::collection::btree_map(
            (0u128..4).prop_map(uuid),
            "[a-z]{0,2}".prop_map(|title| WidgetSettings { title, ..widget() }),
            0..3,
        );
        let verification_keys = prop::collection::vec(
            ("k[0-2]", "[a-z]{1,2}")
                .prop_map(|(kid, public_key)| VerificationKey { kid, public_key }),
            0..3,
        );
        (
            0u64..1_000,
            any::<i64>(),
            verification_keys,
            keys,
            routes,
            plans,
            widgets,
        )
            .prop_map(
                |(revision, generated_at_ms, verification_keys, keys, routes, plans, widgets)| {
                    Snapshot {
                        revision,
                        generated_at_ms,
                        verification_keys,
                        keys,
                        routes,
                        plans,
                        widgets,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn prop_diff_then_apply_equals_new(old in arb_snapshot(), new in arb_snapshot(), step in 1u64..5) {
            let mut new = new;
            new.revision = old.revision + step;
            let delta = Snapshot::diff(&old, &new);
            let mut applied = old.clone();
            prop_assert_eq!(applied.apply(&delta), Ok(()));
            prop_assert_eq!(&applied, &new);
            // Through JSON too, as it travels.
            let delta: Delta = serde_json::from_str(&serde_json::to_string(&delta).unwrap()).unwrap();
            let mut applied = old.clone();
            prop_assert_eq!(applied.apply(&delta), Ok(()));
            prop_assert_eq!(applied, new);
        }

        #[test]
        fn prop_stale_delta_leaves_snapshot_unchanged(old in arb_snapshot(), new in arb_snapshot(), skew in 1u64..5) {
            let mut new = new;
            new.revision = old.revision + 1;
            let delta = Snapshot::diff(&old, &new);
            let mut elsewhere = old.clone();
            elsewhere.revision += skew;
            let before = elsewhere.clone();
            prop_assert!(elsewhere.apply(&delta).is_err());
            prop_assert_eq!(elsewhere, before);
        }

        #[test]
        fn prop_snapshot_json_round_trip(snapshot in arb_snapshot()) {
            let text = serde_json::to_string(&snapshot).unwrap();
            prop_assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), snapshot);
        }
    }
}
