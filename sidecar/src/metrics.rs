//! Prometheus metrics of the sidecar. Labels carry object names and results, never values.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabel {
    object: String,
}

pub struct Metrics {
    registry: Registry,
    fetches: Family<ResultLabel, Counter>,
    syncs: Family<ResultLabel, Counter>,
    notifications: Family<ResultLabel, Counter>,
    last_sync: Family<ObjectLabel, Gauge>,
    delivered: Gauge,
    token_requests: Gauge,
    ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidecar");
        let fetches = Family::<ResultLabel, Counter>::default();
        let syncs = Family::<ResultLabel, Counter>::default();
        let notifications = Family::<ResultLabel, Counter>::default();
        let last_sync = Family::<ObjectLabel, Gauge>::default();
        let delivered = Gauge::default();
        let token_requests = Gauge::default();
        let ready = Gauge::default();
        registry.register("fetches", "Key Vault reads by result (ok, throttled, not_found, denied, unavailable, identity, ...)", fetches.clone());
        registry.register(
            "syncs",
            "Sync cycles by result (changed, unchanged, partial, error)",
            syncs.clone(),
        );
        registry.register(
            "notifications",
            "App notifications after a change, by result",
            notifications.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last successful read, per object",
            last_sync.clone(),
        );
        registry.register(
            "secrets_delivered",
            "Files currently delivered to the output directory",
            delivered.clone(),
        );
        registry.register(
            "token_requests",
            "Tokens requested from the identity source so far",
            token_requests.clone(),
        );
        registry.register(
            "ready",
            "1 once the first complete set of secrets is delivered",
            ready.clone(),
        );
        Self {
            registry,
            fetches,
            syncs,
            notifications,
            last_sync,
            delivered,
            token_requests,
            ready,
        }
    }

    pub fn fetch(&self, result: &'static str) {
        self.fetches.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn sync(&self, result: &'static str) {
        self.syncs.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn notification(&self, ok: bool) {
        self.notifications
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn object_synced(&self, object: &str) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.last_sync
            .get_or_create(&ObjectLabel {
                object: object.to_owned(),
            })
            .set(now);
    }

    pub fn set_delivered(&self, files: usize) {
        self.delivered.set(i64::try_from(files).unwrap_or(i64::MAX));
    }

    pub fn set_token_requests(&self, n: u64) {
        self.token_requests
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_ready(&self) {
        self.ready.set(1);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
