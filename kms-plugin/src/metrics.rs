//! Prometheus metrics of the plugin, served on the HTTP listener's `/metrics`.
//! Labels carry operation names, status codes and public key ids only.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::keyring::KeyRing;
use crate::keystore::KeyState;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Api {
    v2,
    v1beta1,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Op {
    status,
    encrypt,
    decrypt,
    version,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub api: Api,
    pub op: Op,
    /// gRPC status code name, e.g. `Ok`, `InvalidArgument`.
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~1.3 s
    Histogram::new(exponential_buckets(0.000_01, 2.0, 18))
}

/// gRPC status codes are 0..=16.
const CODES: usize = 17;

/// One request label set's counter and histogram, resolved once.
type RequestSlot = std::sync::OnceLock<(Counter, Histogram)>;

pub struct Metrics {
    registry: Registry,
    requests: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// The families' entries by [api][op][code], so recording a request needs no family
    /// lookup (a lock and a hash) after the first request of each kind. Entries are made
    /// on first use, so /metrics lists only label sets that happened.
    request_slots: [[[RequestSlot; CODES]; 4]; 2],
    active_key: Family<KeyLabel, Gauge>,
    keys: Family<StateLabel, Gauge>,
    rotations: Counter,
    reloads: Family<ResultLabel, Counter>,
    active_key_encryptions: Gauge,
    backend_healthy: Gauge,
    rotation_waiting: Gauge,
    store_update_failures: Family<OperationLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kms_plugin");
        let requests = Family::<OpLabels, Counter>::default();
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let active_key = Family::<KeyLabel, Gauge>::default();
        let keys = Family::<StateLabel, Gauge>::default();
        let rotations = Counter::default();
        let reloads = Family::<ResultLabel, Counter>::default();
        let active_key_encryptions = Gauge::default();
        let backend_healthy = Gauge::default();
        let rotation_waiting = Gauge::default();
        let store_update_failures = Family::<OperationLabel, Counter>::default();
        registry.register(
            "key_store_update_failures",
            "Key store updates by this process that failed, by operation (automatic rotation, \
             reserving encryptions): a full or read-only file system, or a backend error",
            store_update_failures.clone(),
        );
        registry.register(
            "rotation_waiting_peers",
            "Peers that must still confirm holding the staged key before it can become active",
            rotation_waiting.clone(),
        );
        registry.register(
            "requests",
            "KMS gRPC requests by API, operation and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "KMS gRPC request latency by API, operation and status code",
            latency.clone(),
        );
        registry.register(
            "active_key",
            "The key id Encrypt uses now (value is always 1)",
            active_key.clone(),
        );
        registry.register("keys", "Keys in the key store by state", keys.clone());
        registry.register(
            "key_rotations",
            "Changes of the active key seen by this process",
            rotations.clone(),
        );
        registry.register(
            "keyring_reloads",
            "Key ring reloads by result",
            reloads.clone(),
        );
        registry.register(
            "active_key_encryptions",
            "Encryptions counted (reserved) under the active key; rotate well before 2^31",
            active_key_encryptions.clone(),
        );
        registry.register(
            "backend_healthy",
            "1 when the key backend (TPM) answers, 0 when it does not (rotation impossible)",
            backend_healthy.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            request_slots: Default::default(),
            active_key,
            keys,
            rotations,
            reloads,
            active_key_encryptions,
            backend_healthy,
            rotation_waiting,
            store_update_failures,
        }
    }

    /// Counts a failed key store update: `rotation` or `reservation`.
    pub fn key_store_update_failed(&self, operation: &'static str) {
        self.store_update_failures
            .get_or_create(&OperationLabel { operation })
            .inc();
    }

    pub fn observe(&self, api: Api, op: Op, code: tonic::Code, seconds: f64) {
        let slot = self
            .request_slots
            .get(api as usize)
            .and_then(|a| a.get(op as usize))
            .and_then(|o| o.get(code as usize));
        let resolve = || {
            let labels = OpLabels {
                api,
                op,
                code: code_name(code),
            };
            (
                self.requests.get_or_create(&labels).clone(),
                self.latency.get_or_create(&labels).clone(),
            )
        };
        match slot {
            Some(slot) => {
                let (requests, latency) = slot.get_or_init(resolve);
                requests.inc();
                latency.observe(seconds);
            }
            // Every Api, Op and Code has a slot; this is for the compiler's sake.
            None => {
                let (requests, latency) = resolve();
                requests.inc();
                latency.observe(seconds);
            }
        }
    }

    /// Updates the key gauges after a (re)load; counts a rotation when the active key changed.
    pub fn ring_loaded(&self, ring: &KeyRing, active_changed: bool) {
        self.active_key.clear();
        if let Some(a) = ring.active() {
            self.active_key
                .get_or_create(&KeyLabel {
                    key_id: a.id.to_string(),
                })
                .set(1);
            self.active_key_encryptions
                .set(i64::try_from(a.used()).unwrap_or(i64::MAX));
        }
        for state in [KeyState::Active, KeyState::DecryptOnly, KeyState::Retired] {
            let n = i64::try_from(ring.count(state)).unwrap_or(i64::MAX);
            self.keys
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n);
        }
        if active_changed {
            self.rotations.inc();
        }
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn set_active_key_encryptions(&self, used: u64) {
        self.active_key_encryptions
            .set(i64::try_from(used).unwrap_or(i64::MAX));
    }

    pub fn set_rotation_waiting(&self, peers: usize) {
        self.rotation_waiting
            .set(i64::try_from(peers).unwrap_or(i64::MAX));
    }

    pub fn set_backend_healthy(&self, healthy: bool) {
        self.backend_healthy.set(i64::from(healthy));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Static names, so recording a request allocates nothing.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_request_metrics_are_the_registered_ones() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.observe(Api::v2, Op::encrypt, tonic::Code::Ok, 0.001);
        }
        m.observe(
            Api::v1beta1,
            Op::version,
            tonic::Code::Unauthenticated,
            0.001,
        );
        let text = m.encode();
        assert!(
            text.contains("kms_plugin_requests_total{api=\"v2\",op=\"encrypt\",code=\"Ok\"} 3"),
            "{text}"
        );
        assert!(text.contains(
            "kms_plugin_request_duration_seconds_count{api=\"v1beta1\",op=\"version\",code=\"Unauthenticated\"} 1"
        ));
        // Label sets that never happened are not listed.
        assert!(!text.contains("op=\"decrypt\""));
    }
}
