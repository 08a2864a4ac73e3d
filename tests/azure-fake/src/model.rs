//! Public value types: faults, targets, endpoints, token flows and statistics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which protocol surface a [`Fault`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Key Vault (`/secrets...`, `/certificates...` and `/keys...` on the HTTPS listener).
    Vault,
    /// Entra ID's token endpoint (`POST /{tenant}/oauth2/v2.0/token`). OpenID discovery is not
    /// affected by `Token` faults, only by `All`.
    Token,
    /// IMDS (`/metadata/identity/oauth2/token` on the plain-HTTP listener).
    Imds,
    /// Azure Arc HIMDS (`/arc/metadata/identity/oauth2/token` on the plain-HTTP listener).
    Arc,
    /// Every request except the `/_fake/` admin API.
    All,
}

impl Target {
    /// Whether a fault aimed at `self` applies to a request for `request`.
    pub fn matches(self, request: Target) -> bool {
        self == Target::All || self == request
    }
}

fn one() -> usize {
    1
}

/// A failure to inject. Faults apply, in the order they were injected, to the next `count`
/// requests of their target (the first fault whose target matches and still has a count
/// left wins; each request consumes at most one fault).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with `status` and the target's usual error body shape (for the vault, a 401
    /// also carries the `WWW-Authenticate` challenge).
    Status {
        target: Target,
        status: u16,
        #[serde(default = "one")]
        count: usize,
    },
    /// 429 with `Retry-After: retry_after_secs`, `x-ms-retry-after-ms` when set, and a
    /// `{"error":{"code":"Throttled",...}}` body (AADSTS / IMDS shaped for those targets).
    Throttle {
        target: Target,
        retry_after_secs: u64,
        #[serde(default)]
        retry_after_ms: Option<u64>,
        #[serde(default = "one")]
        count: usize,
    },
    /// Never answer: the request is held until the client gives up (or the fake stops, or
    /// ten minutes pass), then the connection is closed without a response.
    Hang {
        target: Target,
        #[serde(default = "one")]
        count: usize,
    },
    /// 200 with a body that is not valid JSON.
    Malformed {
        target: Target,
        #[serde(default = "one")]
        count: usize,
    },
    /// 200 with an empty body.
    EmptyBody {
        target: Target,
        #[serde(default = "one")]
        count: usize,
    },
    /// 200 with `bytes` bytes of JSON-looking junk, sent chunked (no `Content-Length`).
    HugeBody {
        target: Target,
        bytes: usize,
        #[serde(default = "one")]
        count: usize,
    },
    /// Close the connection without a response, for every request of the target, until
    /// [`crate::FakeAzure::clear_faults`].
    Down { target: Target },
    /// Answer normally, but only after `delay_ms` milliseconds (useful to observe
    /// concurrency or to trip client timeouts without hanging forever).
    Slow {
        target: Target,
        delay_ms: u64,
        #[serde(default = "one")]
        count: usize,
    },
}

impl Fault {
    /// The fault's target.
    pub fn target(&self) -> Target {
        match self {
            Fault::Status { target, .. }
            | Fault::Throttle { target, .. }
            | Fault::Hang { target, .. }
            | Fault::Malformed { target, .. }
            | Fault::EmptyBody { target, .. }
            | Fault::HugeBody { target, .. }
            | Fault::Down { target }
            | Fault::Slow { target, .. } => *target,
        }
    }

    /// How many requests it applies to; `None` means until cleared.
    pub fn count(&self) -> Option<usize> {
        match self {
            Fault::Status { count, .. }
            | Fault::Throttle { count, .. }
            | Fault::Hang { count, .. }
            | Fault::Malformed { count, .. }
            | Fault::EmptyBody { count, .. }
            | Fault::HugeBody { count, .. }
            | Fault::Slow { count, .. } => Some(*count),
            Fault::Down { .. } => None,
        }
    }
}

/// The endpoint a request was routed to (statistics key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /{tenant}/oauth2/v2.0/token`
    Token,
    /// `GET /{tenant}/v2.0/.well-known/openid-configuration` (MSAL's tenant discovery)
    OpenIdConfiguration,
    /// IMDS token endpoint
    Imds,
    /// Arc HIMDS token endpoint
    Arc,
    /// `GET /secrets/{name}` and `GET /secrets/{name}/{version}`
    VaultGet,
    /// `GET /secrets/{name}/versions`
    VaultListVersions,
    /// `GET /secrets`
    VaultList,
    /// `PUT /secrets/{name}`
    VaultSet,
    /// `GET /certificates/{name}` and `GET /certificates/{name}/{version}`
    VaultGetCertificate,
    /// `GET /keys/{name}` and `GET /keys/{name}/{version}`
    VaultGetKey,
    /// Any other request to the vault (unknown path or method)
    VaultOther,
    /// Anything else that was not the admin API
    Unknown,
}

impl Endpoint {
    /// The fault target this endpoint belongs to (`None`: only `Target::All` faults apply).
    pub fn target(self) -> Option<Target> {
        match self {
            Endpoint::Token => Some(Target::Token),
            Endpoint::Imds => Some(Target::Imds),
            Endpoint::Arc => Some(Target::Arc),
            Endpoint::VaultGet
            | Endpoint::VaultListVersions
            | Endpoint::VaultList
            | Endpoint::VaultSet
            | Endpoint::VaultGetCertificate
            | Endpoint::VaultGetKey
            | Endpoint::VaultOther => Some(Target::Vault),
            Endpoint::OpenIdConfiguration | Endpoint::Unknown => None,
        }
    }

    /// Whether the endpoint is part of Key Vault.
    pub fn is_vault(self) -> bool {
        self.target() == Some(Target::Vault)
    }
}

/// How an access token was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// Entra token endpoint, `client_assertion` without `x5t` in its header (a Kubernetes
    /// service-account token).
    WorkloadIdentity,
    /// Entra token endpoint, `client_assertion` whose JWT header has `x5t` or `x5t#S256`.
    ClientCertificate,
    /// Entra token endpoint, `client_secret`.
    ClientSecret,
    /// IMDS.
    Imds,
    /// Azure Arc HIMDS.
    Arc,
}

/// Per-endpoint counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EndpointStats {
    /// Requests received (counted on arrival, so hung requests count too).
    pub requests: u64,
    /// Responses by status code. `0` counts requests answered with no response at all
    /// (`Down`, `Hang`).
    pub by_status: BTreeMap<u16, u64>,
}

/// One request, as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// Milliseconds since the Unix epoch at arrival.
    pub at_unix_ms: u64,
    pub endpoint: Endpoint,
    pub method: String,
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Status sent; `0` when the connection was dropped without a response.
    pub status: u16,
    /// Whether an `Authorization` header was present.
    pub authorization: bool,
    pub user_agent: Option<String>,
    /// `"HTTP/1.1"` or `"HTTP/2.0"`.
    pub version: String,
}

/// Counters collected since start (or the last [`crate::FakeAzure::reset_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Per-endpoint request and status counts.
    pub endpoints: BTreeMap<Endpoint, EndpointStats>,
    /// Responses by status code over all endpoints (`0` = dropped without response).
    pub by_status: BTreeMap<u16, u64>,
    /// Access tokens issued, per flow.
    pub tokens_issued: BTreeMap<Flow, u64>,
    /// The last workload-identity `client_assertion` presented to the token endpoint
    /// (recorded before it is checked).
    pub last_workload_assertion: Option<String>,
    /// Vault requests in flight right now.
    pub vault_in_flight: usize,
    /// Highest number of vault requests that were in flight at the same time.
    pub max_concurrent_vault_requests: usize,
    /// Faults that were applied to requests.
    pub faults_applied: u64,
    /// The most recent requests (at most 10 000), oldest first.
    pub requests: Vec<RequestRecord>,
}

impl Stats {
    /// Requests received by `endpoint`.
    pub fn requests_to(&self, endpoint: Endpoint) -> u64 {
        self.endpoints.get(&endpoint).map_or(0, |e| e.requests)
    }

    /// Responses with `status` sent by `endpoint`.
    pub fn responses(&self, endpoint: Endpoint, status: u16) -> u64 {
        self.endpoints
            .get(&endpoint)
            .and_then(|e| e.by_status.get(&status))
            .copied()
            .unwrap_or(0)
    }

    /// Responses with `status` over all endpoints.
    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Requests to the Entra token endpoint.
    pub fn token_requests(&self) -> u64 {
        self.requests_to(Endpoint::Token)
    }

    /// Requests to IMDS.
    pub fn imds_requests(&self) -> u64 {
        self.requests_to(Endpoint::Imds)
    }

    /// Requests to Arc HIMDS (challenge and token legs both count).
    pub fn arc_requests(&self) -> u64 {
        self.requests_to(Endpoint::Arc)
    }

    /// `GET /secrets/{name}[/{version}]` requests.
    pub fn vault_get_requests(&self) -> u64 {
        self.requests_to(Endpoint::VaultGet)
    }

    /// `GET /certificates/{name}[/{version}]` requests.
    pub fn certificate_get_requests(&self) -> u64 {
        self.requests_to(Endpoint::VaultGetCertificate)
    }

    /// `GET /keys/{name}[/{version}]` requests.
    pub fn key_get_requests(&self) -> u64 {
        self.requests_to(Endpoint::VaultGetKey)
    }

    /// All vault requests (any vault endpoint).
    pub fn vault_requests(&self) -> u64 {
        self.endpoints
            .iter()
            .filter(|(e, _)| e.is_vault())
            .map(|(_, s)| s.requests)
            .sum()
    }

    /// Tokens issued through `flow`.
    pub fn tokens(&self, flow: Flow) -> u64 {
        self.tokens_issued.get(&flow).copied().unwrap_or(0)
    }

    /// Tokens issued through any flow.
    pub fn total_tokens(&self) -> u64 {
        self.tokens_issued.values().sum()
    }
}
