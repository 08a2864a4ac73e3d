//! Wire-level tests of the fake itself: exact headers, body shapes, flows and faults.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use azure_fake::{Endpoint, FakeAzure, Fault, Flow, Options, Target};
use common::{Client, Proto, Resp, jwt, now, within};
use hyper::Method;
use serde_json::{Value, json};

const SECRET: &str = "correct-horse";

/// A token-endpoint form and the status, `error` and AADSTS code it must get.
type Case<'a> = (Vec<(&'a str, &'a str)>, u16, &'a str, u64);

async fn start(opts: Options) -> (FakeAzure, Client) {
    let fake = FakeAzure::start(Options {
        client_secret: Some(SECRET.into()),
        ..opts
    })
    .await
    .unwrap();
    let client = Client::new(fake.ca_pem()).unwrap();
    (fake, client)
}

fn token_url(fake: &FakeAzure) -> String {
    format!(
        "{}/{}/oauth2/v2.0/token",
        fake.authority_host(),
        fake.options().tenant_id
    )
}

/// A vault token through the client-secret flow.
async fn vault_token(fake: &FakeAzure, client: &Client) -> String {
    let r = client
        .post_form(
            &token_url(fake),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &fake.options().client_id),
                ("client_secret", SECRET),
                ("scope", "https://vault.azure.net/.default"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    r.json()["access_token"].as_str().unwrap().to_owned()
}

async fn vault_get(client: &Client, fake: &FakeAzure, path: &str, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    client
        .get(
            &format!("{}{path}", fake.vault_url()),
            &[("authorization", &auth)],
        )
        .await
        .unwrap()
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

// ------------------------------------------------------------------ Key Vault

#[tokio::test]
async fn vault_challenge_has_exact_format() {
    let (fake, client) = start(Options::default()).await;
    fake.set_secret("db", "v", None);
    let r = client
        .get(
            &format!("{}/secrets/db?api-version=7.5", fake.vault_url()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let expected = format!(
        "Bearer authorization=\"{}/{}\", resource=\"https://vault.azure.net\"",
        fake.authority_host(),
        fake.options().tenant_id
    );
    assert_eq!(r.header("www-authenticate").unwrap(), expected);
    assert_eq!(fake.vault_challenge(), expected);
    assert_eq!(
        r.json(),
        json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}})
    );
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );

    // A custom resource (sovereign clouds) shows up in the challenge.
    let (fake, client) = start(Options {
        vault_resource: "https://vault.azure.cn".into(),
        ..Options::default()
    })
    .await;
    let r = client
        .get(
            &format!("{}/secrets/x?api-version=7.6", fake.vault_url()),
            &[],
        )
        .await
        .unwrap();
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .ends_with(", resource=\"https://vault.azure.cn\"")
    );
}

#[tokio::test]
async fn vault_api_version_is_required_and_checked() {
    let (fake, client) = start(Options::default()).await;
    let token = vault_token(&fake, &client).await;
    let r = vault_get(&client, &fake, "/secrets/db", &token).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "BadParameter");
    let r = vault_get(&client, &fake, "/secrets/db?api-version=1.0", &token).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "BadParameter");
    for v in ["7.5", "7.6", "2025-07-01", "2026-04-01", "7.6-preview"] {
        let r = vault_get(
            &client,
            &fake,
            &format!("/secrets/db?api-version={v}"),
            &token,
        )
        .await;
        assert_eq!(r.status, 404, "api-version {v}");
    }
}

#[tokio::test]
async fn vault_get_returns_full_bundle() {
    let (fake, client) = start(Options::default()).await;
    let v1 = fake.set_secret("Db-Password", "one", Some("text/plain"));
    let v2 = fake.set_secret("db-password", "two", Some("text/plain"));
    assert!(is_hex32(&v1) && is_hex32(&v2) && v1 != v2);
    assert_eq!(
        fake.secret_versions("DB-PASSWORD"),
        vec![v1.clone(), v2.clone()]
    );
    let token = vault_token(&fake, &client).await;

    // Latest, with and without the trailing slash the SDKs send; names are case-insensitive.
    for path in [
        "/secrets/db-password?api-version=7.5",
        "/secrets/db-password/?api-version=7.5",
        "/secrets/DB-PASSWORD?api-version=7.5",
    ] {
        let r = vault_get(&client, &fake, path, &token).await;
        assert_eq!(r.status, 200, "{path}");
        let b = r.json();
        assert_eq!(b["value"], "two");
        assert_eq!(b["contentType"], "text/plain");
        assert_eq!(
            b["id"],
            format!("{}/secrets/Db-Password/{v2}", fake.vault_url())
        );
        let a = &b["attributes"];
        assert_eq!(a["enabled"], true);
        assert!(a["created"].is_u64() && a["updated"].is_u64());
        assert!(a["created"].as_u64().unwrap() + 5 >= now());
        assert_eq!(a["recoveryLevel"], "Recoverable+Purgeable");
        assert!(b.get("kid").is_none() && b.get("managed").is_none());
    }
    // A specific version.
    let r = vault_get(
        &client,
        &fake,
        &format!("/secrets/db-password/{v1}?api-version=7.5"),
        &token,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["value"], "one");
}

#[tokio::test]
async fn vault_errors_have_real_shapes() {
    let (fake, client) = start(Options::default()).await;
    let token = vault_token(&fake, &client).await;

    let r = vault_get(&client, &fake, "/secrets/nope?api-version=7.5", &token).await;
    assert_eq!(r.status, 404);
    let e = r.json();
    assert_eq!(e["error"]["code"], "SecretNotFound");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("A secret with (name/id) nope was not found in this key vault.")
    );

    fake.set_secret("there", "v", None);
    let r = vault_get(
        &client,
        &fake,
        "/secrets/there/0123456789abcdef0123456789abcdef?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(name/id) there/0123456789abcdef0123456789abcdef")
    );

    fake.forbid("there");
    fake.forbid("absent-but-forbidden");
    for name in ["there", "absent-but-forbidden"] {
        let r = vault_get(
            &client,
            &fake,
            &format!("/secrets/{name}?api-version=7.5"),
            &token,
        )
        .await;
        assert_eq!(r.status, 403);
        let e = r.json();
        assert_eq!(e["error"]["code"], "Forbidden");
        assert_eq!(e["error"]["innererror"]["code"], "ForbiddenByRbac");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Caller is not authorized to perform action on resource.")
        );
    }
    fake.allow("there");
    assert_eq!(
        vault_get(&client, &fake, "/secrets/there?api-version=7.5", &token)
            .await
            .status,
        200
    );

    fake.delete_secret("there");
    assert_eq!(
        vault_get(&client, &fake, "/secrets/there?api-version=7.5", &token)
            .await
            .status,
        404
    );

    let r = vault_get(&client, &fake, "/secrets/bad_name?api-version=7.5", &token).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "BadParameter");
}

#[tokio::test]
async fn vault_rejects_bad_tokens() {
    let (fake, client) = start(Options {
        token_lifetime: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    fake.set_secret("db", "v", None);

    // Unknown token.
    let r = vault_get(
        &client,
        &fake,
        "/secrets/db?api-version=7.5",
        "eyJ.not.issued",
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer "));

    // Token for another resource.
    let r = client
        .post_form(
            &token_url(&fake),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &fake.options().client_id),
                ("client_secret", SECRET),
                ("scope", "https://storage.azure.com/.default"),
            ],
        )
        .await
        .unwrap();
    let storage = r.json()["access_token"].as_str().unwrap().to_owned();
    let r = vault_get(&client, &fake, "/secrets/db?api-version=7.5", &storage).await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Invalid audience")
    );

    // A 1 s token works, then expires.
    let token = vault_token(&fake, &client).await;
    assert_eq!(
        vault_get(&client, &fake, "/secrets/db?api-version=7.5", &token)
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        vault_get(&client, &fake, "/secrets/db?api-version=7.5", &token)
            .await
            .status,
        401
    );

    // Revocation.
    let (fake, client) = start(Options::default()).await;
    fake.set_secret("db", "v", None);
    let token = vault_token(&fake, &client).await;
    fake.revoke_tokens();
    assert_eq!(
        vault_get(&client, &fake, "/secrets/db?api-version=7.5", &token)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn vault_lists_versions_in_pages() {
    let (fake, client) = start(Options::default()).await;
    let versions: Vec<String> = (0..5)
        .map(|i| fake.set_secret("rot", &format!("v{i}"), None))
        .collect();
    let token = vault_token(&fake, &client).await;

    let mut url = format!(
        "{}/secrets/rot/versions?api-version=7.5&maxresults=2",
        fake.vault_url()
    );
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let auth = format!("Bearer {token}");
        let r = client.get(&url, &[("authorization", &auth)]).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        pages += 1;
        let b = r.json();
        for item in b["value"].as_array().unwrap() {
            assert!(item.get("value").is_none(), "list items carry no value");
            assert_eq!(item["attributes"]["enabled"], true);
            let id = item["id"].as_str().unwrap();
            let prefix = format!("{}/secrets/rot/", fake.vault_url());
            seen.push(id.strip_prefix(&prefix).unwrap().to_owned());
        }
        match b["nextLink"].as_str() {
            None => {
                assert!(b["nextLink"].is_null(), "nextLink {}", b["nextLink"]);
                break;
            }
            Some(next) => {
                assert!(next.starts_with(&format!("{}/secrets/rot/versions?", fake.vault_url())));
                assert!(next.contains("api-version=7.5") && next.contains("maxresults=2"));
                url = next.to_owned();
            }
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, versions);

    // Default page size holds them all.
    let r = vault_get(
        &client,
        &fake,
        "/secrets/rot/versions?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.json()["value"].as_array().unwrap().len(), 5);
    assert_eq!(r.json()["nextLink"], Value::Null);
    // Out of range.
    let r = vault_get(
        &client,
        &fake,
        "/secrets/rot/versions?api-version=7.5&maxresults=26",
        &token,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = vault_get(
        &client,
        &fake,
        "/secrets/none/versions?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "SecretNotFound");

    // List secrets: ids without version.
    fake.set_secret("other", "x", None);
    let r = vault_get(&client, &fake, "/secrets?api-version=7.5", &token).await;
    let ids: Vec<String> = r.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        vec![
            format!("{}/secrets/other", fake.vault_url()),
            format!("{}/secrets/rot", fake.vault_url())
        ]
    );
}

#[tokio::test]
async fn vault_set_secret_and_certificate_backed_secrets() {
    let (fake, client) = start(Options::default()).await;
    let token = vault_token(&fake, &client).await;
    let auth = format!("Bearer {token}");
    let body = json!({"value": "hello", "contentType": "text/plain", "tags": {"a": "b"}});
    let r = client
        .send(
            Method::PUT,
            &format!("{}/secrets/new-one?api-version=7.5", fake.vault_url()),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(body.to_string().into_bytes()),
            Proto::H1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let b = r.json();
    assert_eq!(b["value"], "hello");
    assert_eq!(b["tags"], json!({"a": "b"}));
    let version = b["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    assert!(is_hex32(&version));
    let r = vault_get(&client, &fake, "/secrets/new-one?api-version=7.5", &token).await;
    assert_eq!(r.json()["value"], "hello");

    // PUT without a value.
    let r = client
        .send(
            Method::PUT,
            &format!("{}/secrets/new-one?api-version=7.5", fake.vault_url()),
            &[("authorization", &auth)],
            Some(b"{}".to_vec()),
            Proto::H1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    for ct in ["application/x-pkcs12", "application/x-pem-file"] {
        let v = fake.set_secret("cert", "data", Some(ct));
        let r = vault_get(&client, &fake, "/secrets/cert?api-version=7.5", &token).await;
        let b = r.json();
        assert_eq!(b["contentType"], ct);
        assert_eq!(b["managed"], true);
        assert_eq!(b["kid"], format!("{}/keys/cert/{v}", fake.vault_url()));
    }
}

#[tokio::test]
async fn vault_speaks_http2() {
    let (fake, client) = start(Options::default()).await;
    fake.set_secret("db", "v", None);
    let token = vault_token(&fake, &client).await;
    let auth = format!("Bearer {token}");
    let r = client
        .send(
            Method::GET,
            &format!("{}/secrets/db?api-version=7.5", fake.vault_url()),
            &[("authorization", &auth)],
            None,
            Proto::H2,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.version, hyper::Version::HTTP_2);
    assert_eq!(r.json()["value"], "v");
    assert_eq!(fake.stats().requests.last().unwrap().version, "HTTP/2.0");
}

#[tokio::test]
async fn certificate_is_valid_for_localhost_and_loopback_ip() {
    let (fake, client) = start(Options::default()).await;
    let port = fake.https_port();
    for host in ["localhost", "127.0.0.1"] {
        let r = client
            .get(
                &format!("https://{host}:{port}/secrets/x?api-version=7.5"),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{host}");
    }
    assert!(fake.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        std::fs::read_to_string(fake.ca_file()).unwrap(),
        fake.ca_pem()
    );
}

// ------------------------------------------------------------------ Entra ID

#[tokio::test]
async fn entra_client_secret_success_shape() {
    let (fake, client) = start(Options::default()).await;
    let r = client
        .post_form(
            &token_url(&fake),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &fake.options().client_id),
                ("client_secret", SECRET),
                ("scope", "https://vault.azure.net/.default"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let b = r.json();
    assert_eq!(b["token_type"], "Bearer");
    assert_eq!(b["expires_in"], json!(3599), "a number, not a string");
    assert_eq!(b["ext_expires_in"], json!(3599));
    assert_eq!(b["access_token"].as_str().unwrap().split('.').count(), 3);
    assert_eq!(b.as_object().unwrap().len(), 4);
    assert_eq!(fake.stats().tokens(Flow::ClientSecret), 1);
}

#[tokio::test]
async fn entra_errors_are_aadsts_shaped() {
    let (fake, client) = start(Options::default()).await;
    let cid = fake.options().client_id.clone();
    let base = [
        ("grant_type", "client_credentials"),
        ("client_id", cid.as_str()),
        ("client_secret", SECRET),
        ("scope", "https://vault.azure.net/.default"),
    ];

    let wrong_tenant = format!(
        "{}/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token",
        fake.authority_host()
    );
    let r = client.post_form(&wrong_tenant, &base).await.unwrap();
    assert_eq!(r.status, 400);
    let e = r.json();
    assert_eq!(e["error"], "invalid_request");
    assert_eq!(e["error_codes"], json!([90002]));
    let desc = e["error_description"].as_str().unwrap();
    assert!(
        desc.starts_with("AADSTS90002: Tenant '00000000-0000-0000-0000-000000000000' not found.")
    );
    assert!(desc.contains("\r\nTrace ID: ") && desc.contains("\r\nCorrelation ID: "));
    for k in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
        assert!(e[k].is_string(), "{k}");
    }

    let cases: Vec<Case<'_>> = vec![
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", cid.as_str()),
                ("client_secret", "wrong"),
                ("scope", "https://vault.azure.net/.default"),
            ],
            401,
            "invalid_client",
            7000215,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", "someone-else"),
                ("client_secret", SECRET),
                ("scope", "https://vault.azure.net/.default"),
            ],
            400,
            "unauthorized_client",
            700016,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", cid.as_str()),
                ("client_secret", SECRET),
                ("scope", "https://vault.azure.net"),
            ],
            400,
            "invalid_scope",
            1002012,
        ),
        (
            vec![
                ("grant_type", "password"),
                ("client_id", cid.as_str()),
                ("client_secret", SECRET),
                ("scope", "https://vault.azure.net/.default"),
            ],
            400,
            "unsupported_grant_type",
            70003,
        ),
        (
            vec![
                ("client_id", cid.as_str()),
                ("client_secret", SECRET),
                ("scope", "https://vault.azure.net/.default"),
            ],
            400,
            "invalid_request",
            900144,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", cid.as_str()),
                ("scope", "https://vault.azure.net/.default"),
            ],
            401,
            "invalid_client",
            7000218,
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", cid.as_str()),
                ("client_assertion", "not-a-jwt"),
                ("client_assertion_type", azure_fake::JWT_BEARER),
                ("scope", "https://vault.azure.net/.default"),
            ],
            400,
            "invalid_client",
            50027,
        ),
    ];
    for (form, status, error, code) in cases {
        let r = client.post_form(&token_url(&fake), &form).await.unwrap();
        let e = r.json();
        assert_eq!(r.status, status, "{form:?}: {e}");
        assert_eq!(e["error"], error, "{form:?}");
        assert_eq!(e["error_codes"], json!([code]), "{form:?}");
        assert!(
            e["error_description"]
                .as_str()
                .unwrap()
                .starts_with(&format!("AADSTS{code}: "))
        );
    }

    // Each fake has its own CA: a client trusting another fake's CA fails the handshake.
    let other = FakeAzure::start(Options::default()).await.unwrap();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", other.options().client_id.as_str()),
        ("client_secret", SECRET),
        ("scope", "https://vault.azure.net/.default"),
    ];
    assert!(client.post_form(&token_url(&other), &form).await.is_err());
    // Without a configured client secret, every secret is refused.
    let other_client = Client::new(other.ca_pem()).unwrap();
    let r = other_client
        .post_form(&token_url(&other), &form)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error_codes"], json!([7000215]));
}

#[tokio::test]
async fn entra_workload_identity_checks_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let sa = |sub: &str, exp: u64| {
        jwt(
            &json!({"alg": "RS256", "kid": "sa"}),
            &json!({"aud": ["api://AzureADTokenExchange"], "sub": sub, "exp": exp}),
        )
    };
    let first = sa("system:serviceaccount:ns:app", now() + 3600);
    std::fs::write(&file, &first).unwrap();
    let (fake, client) = start(Options {
        federated_token_file: Some(file.clone()),
        ..Options::default()
    })
    .await;
    let cid = fake.options().client_id.clone();
    let exchange = |assertion: String| {
        let client = client.clone();
        let url = token_url(&fake);
        let cid = cid.clone();
        async move {
            client
                .post_form(
                    &url,
                    &[
                        ("grant_type", "client_credentials"),
                        ("client_id", cid.as_str()),
                        ("client_assertion", assertion.as_str()),
                        ("client_assertion_type", azure_fake::JWT_BEARER),
                        ("scope", "https://vault.azure.net/.default"),
                    ],
                )
                .await
                .unwrap()
        }
    };

    let r = exchange(first.clone()).await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert!(r.json()["expires_in"].is_u64());
    let stats = fake.stats();
    assert_eq!(stats.tokens(Flow::WorkloadIdentity), 1);
    assert_eq!(
        stats.last_workload_assertion.as_deref(),
        Some(first.as_str())
    );

    // Kubelet rotates the file: only the current contents are accepted.
    let second = sa("system:serviceaccount:ns:app", now() + 7200);
    std::fs::write(&file, format!("{second}\n")).unwrap();
    let r = exchange(first.clone()).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error_codes"], json!([700213]));
    assert_eq!(exchange(second.clone()).await.status, 200);

    // Expired assertion.
    let expired = sa("system:serviceaccount:ns:app", now() - 10);
    std::fs::write(&file, &expired).unwrap();
    let r = exchange(expired).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_codes"], json!([700024]));

    // Wrong assertion type.
    let r = client
        .post_form(
            &token_url(&fake),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", cid.as_str()),
                ("client_assertion", second.as_str()),
                ("client_assertion_type", "urn:something-else"),
                ("scope", "https://vault.azure.net/.default"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    // A certificate assertion (x5t in the header) is a different flow and needs no file.
    for key in ["x5t", "x5t#S256"] {
        let cert = jwt(
            &json!({"alg": "PS256", "typ": "JWT", key: "q83vEjRWeJA"}),
            &json!({"aud": token_url(&fake), "iss": cid, "sub": cid, "exp": now() + 600}),
        );
        let r = exchange(cert).await;
        assert_eq!(r.status, 200, "{key}: {}", r.json());
    }
    assert_eq!(fake.stats().tokens(Flow::ClientCertificate), 2);
}

#[tokio::test]
async fn openid_configuration_points_at_the_token_endpoint() {
    let (fake, client) = start(Options::default()).await;
    let tenant = fake.options().tenant_id.clone();
    let r = client
        .get(
            &format!(
                "{}/{tenant}/v2.0/.well-known/openid-configuration",
                fake.authority_host()
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let b = r.json();
    assert_eq!(b["token_endpoint"], token_url(&fake));
    assert!(b["authorization_endpoint"].is_string());
    assert_eq!(
        b["issuer"],
        format!("{}/{tenant}/v2.0", fake.authority_host())
    );
}

// ------------------------------------------------------------------ IMDS and Arc

fn imds_url(fake: &FakeAzure, extra: &str) -> String {
    format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net{extra}",
        fake.imds_endpoint()
    )
}

fn assert_string_token_response(b: &Value, resource: &str) {
    for k in [
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(b[k].is_string(), "{k} must be a string: {b}");
    }
    assert_eq!(b["expires_in"], "3599");
    assert_eq!(b["ext_expires_in"], "3599");
    assert_eq!(b["token_type"], "Bearer");
    assert_eq!(b["resource"], resource);
    let on: u64 = b["expires_on"].as_str().unwrap().parse().unwrap();
    let nb: u64 = b["not_before"].as_str().unwrap().parse().unwrap();
    assert_eq!(on - nb, 3600);
}

#[tokio::test]
async fn imds_requires_metadata_header_and_answers_strings() {
    let (fake, client) = start(Options::default()).await;
    let r = client.get(&imds_url(&fake, ""), &[]).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"error": "invalid_request", "error_description": "Required metadata header not specified"})
    );

    let r = client
        .get(&imds_url(&fake, ""), &[("metadata", "true")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let b = r.json();
    assert_string_token_response(&b, "https://vault.azure.net");
    assert_eq!(b["client_id"], fake.options().client_id.as_str());

    // The token works at the vault.
    fake.set_secret("db", "v", None);
    let token = b["access_token"].as_str().unwrap();
    assert_eq!(
        vault_get(&client, &fake, "/secrets/db?api-version=7.5", token)
            .await
            .status,
        200
    );

    // User-assigned by client_id: known and unknown.
    let cid = fake.options().client_id.clone();
    let r = client
        .get(
            &imds_url(&fake, &format!("&client_id={cid}")),
            &[("Metadata", "true")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = client
        .get(
            &imds_url(&fake, "&client_id=unknown"),
            &[("Metadata", "true")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_description"], "Identity not found");
    // msi_res_id is echoed.
    let r = client
        .get(
            &imds_url(&fake, "&msi_res_id=/subscriptions/x/id"),
            &[("Metadata", "true")],
        )
        .await
        .unwrap();
    assert_eq!(r.json()["msi_res_id"], "/subscriptions/x/id");

    // Missing resource.
    let r = client
        .get(
            &format!(
                "{}/metadata/identity/oauth2/token?api-version=2018-02-01",
                fake.imds_endpoint()
            ),
            &[("Metadata", "true")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_request");
    assert_eq!(fake.stats().tokens(Flow::Imds), 3);
}

#[tokio::test]
async fn arc_key_file_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("tokens");
    let (fake, client) = start(Options {
        arc_key_dir: keys.clone(),
        ..Options::default()
    })
    .await;
    let url = format!(
        "{}?api-version=2020-06-01&resource=https://vault.azure.net",
        fake.arc_identity_endpoint()
    );
    assert_eq!(
        fake.arc_identity_endpoint(),
        format!(
            "{}/arc/metadata/identity/oauth2/token",
            fake.imds_endpoint()
        )
    );

    // Metadata header is required here too.
    assert_eq!(client.get(&url, &[]).await.unwrap().status, 400);

    let r = client.get(&url, &[("Metadata", "true")]).await.unwrap();
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap();
    let path = challenge.strip_prefix("Basic realm=").unwrap();
    let path = std::path::Path::new(path);
    assert_eq!(path.parent().unwrap(), keys);
    assert_eq!(path.extension().unwrap(), "key");
    let stem = path.file_stem().unwrap().to_str().unwrap();
    assert!(is_hex32(stem));
    let secret = std::fs::read_to_string(path).unwrap();
    assert!(!secret.is_empty() && secret.len() <= 4096);

    let auth = format!("Basic {secret}");
    let r = client
        .get(&url, &[("Metadata", "true"), ("Authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_string_token_response(&r.json(), "https://vault.azure.net");

    // Wrong secret: challenged again with a fresh file.
    let r = client
        .get(
            &url,
            &[("Metadata", "true"), ("Authorization", "Basic nope")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let again = r.header("www-authenticate").unwrap();
    assert_ne!(again, challenge);

    let stats = fake.stats();
    assert_eq!(stats.tokens(Flow::Arc), 1);
    assert_eq!(stats.responses(Endpoint::Arc, 401), 2);
    assert_eq!(stats.arc_requests(), 4);

    // Stopping the fake removes the key files and the directory it created.
    drop(fake);
    assert!(!keys.exists());
}

// ------------------------------------------------------------------ faults

#[tokio::test]
async fn throttle_fault_headers_body_and_count() {
    let (fake, client) = start(Options::default()).await;
    fake.set_secret("db", "v", None);
    let token = vault_token(&fake, &client).await;
    fake.inject(Fault::Throttle {
        target: Target::Vault,
        retry_after_secs: 3,
        retry_after_ms: Some(2500),
        count: 2,
    });
    for _ in 0..2 {
        let r = vault_get(&client, &fake, "/secrets/db?api-version=7.5", &token).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after").as_deref(), Some("3"));
        assert_eq!(r.header("x-ms-retry-after-ms").as_deref(), Some("2500"));
        assert_eq!(r.json()["error"]["code"], "Throttled");
    }
    let r = vault_get(&client, &fake, "/secrets/db?api-version=7.5", &token).await;
    assert_eq!(r.status, 200);

    // On the token endpoint, the body is AADSTS-shaped.
    fake.inject(Fault::Throttle {
        target: Target::Token,
        retry_after_secs: 1,
        retry_after_ms: None,
        count: 1,
    });
    let r = client
        .post_form(&token_url(&fake), &[("grant_type", "client_credentials")])
        .await
        .unwrap();
    assert_eq!(r.status, 429);
    assert!(r.header("x-ms-retry-after-ms").is_none());
    assert!(r.json()["error_codes"].is_array());

    let stats = fake.stats();
    assert_eq!(stats.responses(Endpoint::VaultGet, 429), 2);
    assert_eq!(stats.responses(Endpoint::VaultGet, 200), 1);
    assert_eq!(stats.responses(Endpoint::Token, 429), 1);
    assert_eq!(stats.status_count(429), 3);
    assert_eq!(stats.vault_get_requests(), 3);
    assert_eq!(stats.faults_applied, 3);
}

#[tokio::test]
async fn status_malformed_empty_and_huge_faults() {
    let (fake, client) = start(Options::default()).await;
    let imds = imds_url(&fake, "");
    let md = [("Metadata", "true")];

    fake.inject(Fault::Status {
        target: Target::Imds,
        status: 410,
        count: 1,
    });
    let r = client.get(&imds, &md).await.unwrap();
    assert_eq!(r.status, 410);
    assert!(r.json()["error"].is_string());

    fake.inject(Fault::Malformed {
        target: Target::Imds,
        count: 1,
    });
    let r = client.get(&imds, &md).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());

    fake.inject(Fault::EmptyBody {
        target: Target::All,
        count: 1,
    });
    let r = client.get(&imds, &md).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());

    fake.inject(Fault::HugeBody {
        target: Target::Imds,
        bytes: 3 * 1024 * 1024 + 7,
        count: 1,
    });
    let r = client.get(&imds, &md).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("content-length").is_none());
    assert_eq!(r.body.len(), 3 * 1024 * 1024 + 7);
    assert!(r.body.starts_with(b"{\"junk\":\""));

    // Faults on other targets do not touch IMDS.
    fake.inject(Fault::Status {
        target: Target::Vault,
        status: 500,
        count: 1,
    });
    assert_eq!(client.get(&imds, &md).await.unwrap().status, 200);
    fake.clear_faults();

    // A 401 injected at the vault carries the challenge.
    fake.inject(Fault::Status {
        target: Target::Vault,
        status: 401,
        count: 1,
    });
    let r = client
        .get(
            &format!("{}/secrets/x?api-version=7.5", fake.vault_url()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").unwrap(),
        fake.vault_challenge()
    );
}

#[tokio::test]
async fn down_and_hang_faults() {
    let (fake, client) = start(Options::default()).await;
    let imds = imds_url(&fake, "");
    let md = [("Metadata", "true")];

    fake.inject(Fault::Down {
        target: Target::Imds,
    });
    for _ in 0..3 {
        let r = within(5, client.get(&imds, &md)).await.unwrap();
        assert!(
            r.is_err(),
            "Down must close the connection without a response"
        );
    }
    fake.clear_faults();
    assert_eq!(client.get(&imds, &md).await.unwrap().status, 200);

    fake.inject(Fault::Hang {
        target: Target::Vault,
        count: 1,
    });
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_millis(700),
        client.get(
            &format!("{}/secrets/x?api-version=7.5", fake.vault_url()),
            &[],
        ),
    )
    .await;
    assert!(r.is_err(), "Hang must not answer");
    assert!(started.elapsed() >= Duration::from_millis(650));
    // Only one request hangs.
    let r = client
        .get(
            &format!("{}/secrets/x?api-version=7.5", fake.vault_url()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let stats = fake.stats();
    assert_eq!(stats.responses(Endpoint::Imds, 0), 3);
    assert_eq!(stats.responses(Endpoint::VaultGet, 0), 1);
}

#[tokio::test]
async fn slow_fault_and_vault_concurrency() {
    let (fake, client) = start(Options::default()).await;
    fake.set_secret("db", "v", None);
    let token = vault_token(&fake, &client).await;
    fake.inject(Fault::Slow {
        target: Target::Vault,
        delay_ms: 400,
        count: 4,
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = format!("{}/secrets/db?api-version=7.5", fake.vault_url());
        let auth = format!("Bearer {token}");
        tasks.push(tokio::spawn(async move {
            client
                .get(&url, &[("authorization", &auth)])
                .await
                .unwrap()
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "served concurrently"
    );
    let stats = fake.stats();
    assert_eq!(stats.max_concurrent_vault_requests, 4);
    assert_eq!(stats.vault_in_flight, 0);
    fake.reset_stats();
    assert_eq!(fake.stats().vault_requests(), 0);
}

#[tokio::test]
async fn request_log_records_what_was_sent() {
    let (fake, client) = start(Options::default()).await;
    let _ = client
        .get(
            &format!("{}/secrets/x?api-version=7.5", fake.vault_url()),
            &[("user-agent", "sidecar-test/1")],
        )
        .await
        .unwrap();
    let stats = fake.stats();
    let rec = stats.requests.last().unwrap();
    assert_eq!(rec.endpoint, Endpoint::VaultGet);
    assert_eq!(rec.method, "GET");
    assert_eq!(rec.path, "/secrets/x");
    assert_eq!(rec.query.as_deref(), Some("api-version=7.5"));
    assert_eq!(rec.status, 401);
    assert!(!rec.authorization);
    assert_eq!(rec.user_agent.as_deref(), Some("sidecar-test/1"));
}

#[tokio::test]
async fn admin_api_controls_the_fake() {
    let (fake, client) = start(Options::default()).await;
    let admin = fake.admin_endpoint();
    let r = client
        .send(
            Method::PUT,
            &format!("{admin}/secrets/db"),
            &[("content-type", "application/json")],
            Some(br#"{"value":"v","contentType":"application/x-pem-file"}"#.to_vec()),
            Proto::H1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        fake.secret_versions("db"),
        vec![r.json()["version"].as_str().unwrap().to_owned()]
    );

    let r = client
        .send(
            Method::POST,
            &format!("{admin}/faults"),
            &[],
            Some(br#"{"kind":"status","target":"imds","status":503}"#.to_vec()),
            Proto::H1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let r = client
        .get(&imds_url(&fake, ""), &[("Metadata", "true")])
        .await
        .unwrap();
    assert_eq!(r.status, 503);

    let r = client.get(&format!("{admin}/stats"), &[]).await.unwrap();
    let s = r.json();
    assert_eq!(s["endpoints"]["imds"]["by_status"]["503"], 1);
    assert_eq!(s["faults_applied"], 1);
    // Admin calls are not counted.
    assert!(s["endpoints"].get("unknown").is_none());
}

// ------------------------------------------------------- Key Vault certificates and keys

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    B64URL.encode(bytes)
}

fn unb64url(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    B64URL.decode(s).unwrap()
}

/// A test CA and an EC P-256 leaf certificate it signed (SAN `leaf.example`): `(leaf key,
/// leaf, CA)`.
fn ec_chain(cn: &str) -> (rcgen::KeyPair, rcgen::Certificate, rcgen::Certificate) {
    use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{cn} CA"));
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["leaf.example".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let leaf = params
        .signed_by(&leaf_key, &Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    (leaf_key, leaf, ca)
}

fn run_openssl(dir: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An RSA-2048 leaf signed by a CA, exported with openssl as Key Vault stores a PFX (base64,
/// empty password, the CA in the bag too): `(base64 PFX, leaf DER, modulus)`.
fn rsa_pkcs12(dir: &std::path::Path) -> (String, Vec<u8>, Vec<u8>) {
    use base64::Engine as _;
    let o = |args: &[&str]| run_openssl(dir, args);
    o(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=pfx CA",
        "-days",
        "2",
    ]);
    o(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=pfx leaf",
    ]);
    o(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
    ]);
    // The CA first in the bag: the leaf is the certificate that goes with the key.
    o(&[
        "pkcs12",
        "-export",
        "-inkey",
        "leaf.key",
        "-in",
        "leaf.pem",
        "-certfile",
        "ca.pem",
        "-passout",
        "pass:",
        "-out",
        "leaf.p12",
    ]);
    let der = o(&["x509", "-in", "leaf.pem", "-outform", "der"]);
    let modulus = String::from_utf8(o(&["x509", "-in", "leaf.pem", "-noout", "-modulus"])).unwrap();
    let hex = modulus.trim().strip_prefix("Modulus=").unwrap();
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let pfx = std::fs::read(dir.join("leaf.p12")).unwrap();
    (B64.encode(pfx), der, n)
}

fn x5t(der: &[u8]) -> String {
    use sha1::Digest as _;
    b64url(&sha1::Sha1::digest(der))
}

#[tokio::test]
async fn certificates_of_pem_and_pkcs12_backed_secrets() {
    use base64::Engine as _;
    let (fake, client) = start(Options::default()).await;
    let token = vault_token(&fake, &client).await;
    let vault = fake.vault_url();

    // PEM: key, leaf, CA. The certificate is the leaf.
    let (key, leaf, ca) = ec_chain("pem leaf");
    let pem = format!("{}{}{}", key.serialize_pem(), leaf.pem(), ca.pem());
    let v1 = fake.set_secret("Web-Tls", &pem, Some("application/x-pem-file"));
    for path in [
        "/certificates/web-tls?api-version=7.5",
        "/certificates/WEB-TLS/?api-version=7.6",
    ] {
        let r = vault_get(&client, &fake, path, &token).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json());
        let b = r.json();
        assert_eq!(
            B64.decode(b["cer"].as_str().unwrap()).unwrap(),
            leaf.der().to_vec()
        );
        assert_eq!(b["x5t"], x5t(leaf.der()));
        assert_eq!(b["id"], format!("{vault}/certificates/Web-Tls/{v1}"));
        assert_eq!(b["kid"], format!("{vault}/keys/Web-Tls/{v1}"));
        assert_eq!(b["sid"], format!("{vault}/secrets/Web-Tls/{v1}"));
        assert_eq!(b["contentType"], "application/x-pem-file");
        let a = &b["attributes"];
        assert_eq!(a["enabled"], true);
        assert!(a["nbf"].as_i64().unwrap() < a["exp"].as_i64().unwrap());
        assert!(a["created"].is_u64() && a["updated"].is_u64());
        assert_eq!(a["recoveryLevel"], "Recoverable+Purgeable");
        // The latest version comes with the policy.
        let p = &b["policy"];
        assert_eq!(p["id"], format!("{vault}/certificates/Web-Tls/policy"));
        assert_eq!(p["key_props"]["kty"], "EC");
        assert_eq!(p["key_props"]["crv"], "P-256");
        assert_eq!(p["secret_props"]["contentType"], "application/x-pem-file");
        assert_eq!(p["x509_props"]["subject"], "CN=pem leaf");
        assert_eq!(
            p["x509_props"]["sans"]["dns_names"],
            json!(["leaf.example"])
        );
        assert!(b.get("value").is_none() && b.get("managed").is_none());
    }
    // The backing secret's kid now resolves.
    let r = vault_get(&client, &fake, "/secrets/web-tls?api-version=7.5", &token).await;
    assert_eq!(r.json()["kid"], format!("{vault}/keys/Web-Tls/{v1}"));

    // A second version: latest changes, the first stays reachable (without policy).
    let (_, leaf2, _) = ec_chain("second");
    let v2 = fake.set_secret("web-tls", &leaf2.pem(), Some("application/x-pem-file"));
    let r = vault_get(
        &client,
        &fake,
        "/certificates/web-tls?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.json()["x5t"], x5t(leaf2.der()));
    assert_eq!(r.json()["id"], format!("{vault}/certificates/Web-Tls/{v2}"));
    let r = vault_get(
        &client,
        &fake,
        &format!(
            "/certificates/web-tls/{}?api-version=7.5",
            v1.to_uppercase()
        ),
        &token,
    )
    .await;
    assert_eq!(r.status, 200);
    let b = r.json();
    assert_eq!(b["x5t"], x5t(leaf.der()));
    assert!(b.get("policy").is_none(), "no policy for a version: {b}");

    // PKCS#12 from openssl, RSA, with its CA in the bag.
    let dir = tempfile::tempdir().unwrap();
    let (pfx, der, modulus) = rsa_pkcs12(dir.path());
    let v = fake.set_secret("pfx", &pfx, Some("application/x-pkcs12"));
    let r = vault_get(
        &client,
        &fake,
        &format!("/certificates/pfx/{v}?api-version=7.5"),
        &token,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let b = r.json();
    assert_eq!(B64.decode(b["cer"].as_str().unwrap()).unwrap(), der);
    assert_eq!(b["x5t"], x5t(&der));
    assert_eq!(b["contentType"], "application/x-pkcs12");
    let r = vault_get(&client, &fake, "/certificates/pfx?api-version=7.5", &token).await;
    let p = &r.json()["policy"];
    assert_eq!(p["key_props"]["kty"], "RSA");
    assert_eq!(p["key_props"]["key_size"], 2048);
    assert_eq!(p["x509_props"]["subject"], "CN=pfx leaf");

    // Its key, and the PEM certificate's key.
    let r = vault_get(&client, &fake, "/keys/pfx?api-version=7.5", &token).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let b = r.json();
    assert_eq!(b["key"]["kid"], format!("{vault}/keys/pfx/{v}"));
    assert_eq!(b["key"]["kty"], "RSA");
    assert_eq!(unb64url(b["key"]["n"].as_str().unwrap()), modulus);
    assert_eq!(b["key"]["e"], "AQAB");
    assert!(b["key"].get("d").is_none());
    assert_eq!(b["managed"], true);
    assert!(b["attributes"]["exp"].is_i64());
    let r = vault_get(
        &client,
        &fake,
        &format!("/keys/web-tls/{v1}?api-version=7.5"),
        &token,
    )
    .await;
    let k = &r.json()["key"];
    let point = key.public_key_raw();
    assert_eq!(k["kty"], "EC");
    assert_eq!(k["crv"], "P-256");
    assert_eq!(k["x"], b64url(&point[1..33]));
    assert_eq!(k["y"], b64url(&point[33..]));
    assert_eq!(k["key_ops"], json!(["sign", "verify"]));

    let st = fake.stats();
    assert_eq!(st.certificate_get_requests(), 6);
    assert_eq!(st.key_get_requests(), 2);
    assert_eq!(st.responses(Endpoint::VaultGetCertificate, 200), 6);
    assert_eq!(
        st.vault_get_requests(),
        1,
        "certificate reads are not secret reads"
    );
}

#[tokio::test]
async fn certificate_errors_and_faults() {
    let (fake, client) = start(Options::default()).await;
    let token = vault_token(&fake, &client).await;
    let (_, leaf, _) = ec_chain("c");
    fake.set_secret("c", &leaf.pem(), Some("application/x-pem-file"));

    // Unauthenticated: the challenge, as for secrets.
    let r = client
        .get(
            &format!("{}/certificates/c?api-version=7.5", fake.vault_url()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").unwrap(),
        fake.vault_challenge()
    );
    let r = vault_get(&client, &fake, "/certificates/c", &token).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "BadParameter");

    let r = vault_get(&client, &fake, "/certificates/nope?api-version=7.5", &token).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "CertificateNotFound");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("A certificate with (name/id) nope was not found in this key vault.")
    );
    let r = vault_get(
        &client,
        &fake,
        "/certificates/c/0123456789abcdef0123456789abcdef?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(name/id) c/0123456789abcdef0123456789abcdef")
    );
    // A plain secret, and one PUT through the vault with a certificate content type, back
    // no certificate (Key Vault only makes those through the certificate API).
    fake.set_secret("plain", "v", Some("text/plain"));
    let auth = format!("Bearer {token}");
    let r = client
        .send(
            Method::PUT,
            &format!("{}/secrets/put-pem?api-version=7.5", fake.vault_url()),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(
                json!({"value": leaf.pem(), "contentType": "application/x-pem-file"})
                    .to_string()
                    .into_bytes(),
            ),
            Proto::H1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    for name in ["plain", "put-pem"] {
        let r = vault_get(
            &client,
            &fake,
            &format!("/certificates/{name}?api-version=7.5"),
            &token,
        )
        .await;
        assert_eq!(r.status, 404, "{name}");
        assert_eq!(r.json()["error"]["code"], "CertificateNotFound");
    }
    // The latest certificate is the latest certificate-backed version.
    let v_cert = fake.secret_versions("c")[0].clone();
    fake.set_secret("c", "not a certificate any more", None);
    let r = vault_get(&client, &fake, "/certificates/c?api-version=7.5", &token).await;
    assert_eq!(
        r.json()["id"],
        format!("{}/certificates/c/{v_cert}", fake.vault_url())
    );

    // A value that is not what its content type says: a 500 that explains.
    fake.set_secret("junk", "data", Some("application/x-pkcs12"));
    fake.set_secret("junk-pem", "no blocks", Some("application/x-pem-file"));
    for name in ["junk", "junk-pem"] {
        let r = vault_get(
            &client,
            &fake,
            &format!("/certificates/{name}?api-version=7.5"),
            &token,
        )
        .await;
        assert_eq!(r.status, 500, "{name}");
        let m = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(m.contains("holds no usable certificate"), "{m}");
    }

    fake.forbid("c");
    let r = vault_get(&client, &fake, "/certificates/c?api-version=7.5", &token).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["innererror"]["code"], "ForbiddenByRbac");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Action: 'Microsoft.KeyVault/vaults/certificates/read'")
    );
    fake.allow("c");

    // Faults aimed at the vault hit certificate reads too.
    fake.inject(Fault::Throttle {
        target: Target::Vault,
        retry_after_secs: 2,
        retry_after_ms: None,
        count: 1,
    });
    let r = vault_get(&client, &fake, "/certificates/c?api-version=7.5", &token).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some("2"));
    assert_eq!(
        vault_get(&client, &fake, "/certificates/c?api-version=7.5", &token)
            .await
            .status,
        200
    );

    // What the fake does not serve.
    let r = vault_get(
        &client,
        &fake,
        "/certificates/c/versions?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 405);
    let r = vault_get(&client, &fake, "/certificates?api-version=7.5", &token).await;
    assert_eq!(r.status, 405);
    let r = vault_get(
        &client,
        &fake,
        "/certificates/bad_name?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 400);
    let st = fake.stats();
    assert_eq!(st.responses(Endpoint::VaultGetCertificate, 429), 1);
    assert_eq!(st.responses(Endpoint::VaultOther, 405), 2);

    // Deleting the secret deletes the certificate.
    fake.delete_secret("c");
    assert_eq!(
        vault_get(&client, &fake, "/certificates/c?api-version=7.5", &token)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn keys_set_with_jwks() {
    let (fake, client) = start(Options::default()).await;
    let token = vault_token(&fake, &client).await;
    let vault = fake.vault_url();
    let n = b64url(&[0xc5; 256]);
    let v1 = fake.set_key(
        "Signing",
        json!({"kty": "RSA", "n": n, "e": "AQAB", "d": "secret-exponent", "kid": "ignored"}),
    );
    let v2 = fake.set_key(
        "signing",
        json!({"kty": "EC-HSM", "crv": "P-384", "x": "eA", "y": "eQ", "key_ops": ["verify"]}),
    );
    assert!(is_hex32(&v1) && is_hex32(&v2) && v1 != v2);
    assert_eq!(fake.key_versions("SIGNING"), vec![v1.clone(), v2.clone()]);

    let r = vault_get(&client, &fake, "/keys/signing?api-version=7.5", &token).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let b = r.json();
    assert_eq!(
        b["key"],
        json!({"kid": format!("{vault}/keys/Signing/{v2}"), "kty": "EC-HSM", "crv": "P-384",
               "x": "eA", "y": "eQ", "key_ops": ["verify"]})
    );
    let a = &b["attributes"];
    assert_eq!(a["enabled"], true);
    assert_eq!(a["recoveryLevel"], "Recoverable+Purgeable");
    assert!(a["created"].is_u64() && b.get("managed").is_none());

    let r = vault_get(
        &client,
        &fake,
        &format!("/keys/SIGNING/{v1}/?api-version=7.5"),
        &token,
    )
    .await;
    assert_eq!(
        r.json()["key"],
        json!({"kid": format!("{vault}/keys/Signing/{v1}"), "kty": "RSA", "n": n, "e": "AQAB",
               "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]}),
        "no private members, kid from the fake, default key_ops"
    );

    let r = vault_get(&client, &fake, "/keys/nope?api-version=7.5", &token).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "KeyNotFound");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("A key with (name/id) nope was not found in this key vault.")
    );
    let r = vault_get(
        &client,
        &fake,
        "/keys/signing/0123456789abcdef0123456789abcdef?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "KeyNotFound");
    // A secret is not a key.
    fake.set_secret("just-a-secret", "v", None);
    let r = vault_get(
        &client,
        &fake,
        "/keys/just-a-secret?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 404);

    fake.forbid("signing");
    let r = vault_get(&client, &fake, "/keys/signing?api-version=7.5", &token).await;
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Action: 'Microsoft.KeyVault/vaults/keys/read'")
    );
    fake.allow("signing");
    let r = client
        .get(&format!("{vault}/keys/signing?api-version=7.5"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").unwrap(),
        fake.vault_challenge()
    );

    // A key set explicitly hides a certificate's key of the same name.
    let (_, leaf, _) = ec_chain("both");
    fake.set_secret("both", &leaf.pem(), Some("application/x-pem-file"));
    let r = vault_get(&client, &fake, "/keys/both?api-version=7.5", &token).await;
    assert_eq!(r.json()["managed"], true);
    fake.set_key("both", json!({"kty": "RSA", "n": n, "e": "AQAB"}));
    let r = vault_get(&client, &fake, "/keys/both?api-version=7.5", &token).await;
    assert_eq!(r.json()["key"]["kty"], "RSA");
    fake.delete_key("both");
    let r = vault_get(&client, &fake, "/keys/both?api-version=7.5", &token).await;
    assert_eq!(r.json()["key"]["kty"], "EC");

    // Over HTTP/2, and through faults.
    fake.inject(Fault::Malformed {
        target: Target::Vault,
        count: 1,
    });
    let r = vault_get(&client, &fake, "/keys/signing?api-version=7.5", &token).await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    let auth = format!("Bearer {token}");
    let r = client
        .send(
            Method::GET,
            &format!("{vault}/keys/signing?api-version=7.5"),
            &[("authorization", &auth)],
            None,
            Proto::H2,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.version, hyper::Version::HTTP_2);
    let r = vault_get(
        &client,
        &fake,
        "/keys/signing/versions?api-version=7.5",
        &token,
    )
    .await;
    assert_eq!(r.status, 405);
    let st = fake.stats();
    assert_eq!(st.responses(Endpoint::VaultGetKey, 200), 7);
    assert_eq!(st.responses(Endpoint::VaultGetKey, 404), 3);
    assert_eq!(
        st.key_get_requests(),
        12,
        "a versions list is not a key read"
    );
}

#[tokio::test]
async fn admin_api_sets_and_deletes_keys() {
    let (fake, client) = start(Options::default()).await;
    let admin = fake.admin_endpoint();
    let put = |body: &'static str| {
        let client = client.clone();
        let url = format!("{admin}/keys/from-admin");
        async move {
            client
                .send(
                    Method::PUT,
                    &url,
                    &[("content-type", "application/json")],
                    Some(body.as_bytes().to_vec()),
                    Proto::H1,
                )
                .await
                .unwrap()
        }
    };
    let r = put(r#"{"kty":"EC","crv":"P-256","x":"AA","y":"AQ","d":"private"}"#).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let version = r.json()["version"].as_str().unwrap().to_owned();
    assert_eq!(fake.key_versions("from-admin"), vec![version.clone()]);
    assert_eq!(put("[1]").await.status, 400);
    assert_eq!(put("{").await.status, 400);

    let token = vault_token(&fake, &client).await;
    let r = vault_get(&client, &fake, "/keys/from-admin?api-version=7.5", &token).await;
    assert_eq!(r.json()["key"]["x"], "AA");
    assert!(r.json()["key"].get("d").is_none());

    let r = client
        .send(
            Method::DELETE,
            &format!("{admin}/keys/from-admin"),
            &[],
            None,
            Proto::H1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert!(fake.key_versions("from-admin").is_empty());
    let r = vault_get(&client, &fake, "/keys/from-admin?api-version=7.5", &token).await;
    assert_eq!(r.status, 404);
}
