#!/usr/bin/env python3
"""Prove azure-fake against the official Azure SDK for Python.

Usage: python3 check_sdk.py STATE_DIR/ready.json

ready.json is what `azure-fake serve` writes. The fake must have been seeded with
`db-password` (value "s3cret", contentType "text/plain") and `tls-cert` (contentType
"application/x-pem-file"), and started with --client-secret (the ClientSecretCredential
check needs it). For the Arc check the fake must write its key files into
/var/opt/azcmagent/tokens (--arc-key-dir), the only place the SDK reads them from on
Linux; otherwise that check is reported as SKIPPED with the reason.

Exits 0 when every check passed, 1 on any mismatch (each failure printed with what was
expected and what came back), 2 on bad usage, 3 when the SDK packages are missing.
"""

import base64
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
import urllib.request

ARC_SDK_KEY_DIR = "/var/opt/azcmagent/tokens"
REQUIREMENTS = "tests/azure-fake/python/requirements.txt"

# Variables the SDK reads to pick an identity source: cleared so the machine's own
# environment cannot steer the checks.
IDENTITY_ENV = [
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
]

try:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
    )
    from azure.identity import (
        CertificateCredential,
        ClientSecretCredential,
        ManagedIdentityCredential,
        WorkloadIdentityCredential,
    )
    from azure.keyvault.secrets import SecretClient
except ImportError as exc:  # pragma: no cover - depends on the machine
    print(
        "check_sdk: the Azure SDK for Python is not installed ({}).\n"
        "Install it with: pip install -r {}".format(exc, REQUIREMENTS),
        file=sys.stderr,
    )
    sys.exit(3)


class Mismatch(Exception):
    """The SDK saw something other than what the real service would produce."""


def expect(cond, message):
    if not cond:
        raise Mismatch(message)


class Fake:
    """The fake's /_fake admin API (plain HTTP on 127.0.0.1, no proxy)."""

    def __init__(self, admin):
        self.admin = admin.rstrip("/")
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with self.opener.open(req, timeout=10) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def stats(self):
        return self._call("GET", "/stats")

    def inject(self, fault):
        self._call("POST", "/faults", fault)

    def clear_faults(self):
        self._call("DELETE", "/faults")

    def forbid(self, name):
        self._call("POST", "/secrets/{}/forbid".format(name))

    def set_secret(self, name, value, content_type=None):
        body = {"value": value}
        if content_type:
            body["contentType"] = content_type
        return self._call("PUT", "/secrets/{}".format(name), body)["version"]


def tokens(stats, flow):
    return stats["tokens_issued"].get(flow, 0)


def responses(stats, endpoint, status):
    return stats["endpoints"].get(endpoint, {}).get("by_status", {}).get(str(status), 0)


def requests_to(stats, endpoint):
    return stats["endpoints"].get(endpoint, {}).get("requests", 0)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fake_service_account_token(audience="api://AzureADTokenExchange"):
    """A JWT shaped like a projected Kubernetes service-account token (unsigned)."""
    now = int(time.time())
    header = {"alg": "RS256", "kid": "azure-fake-sa"}
    claims = {
        "aud": [audience],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": "https://oidc.example.invalid/",
        "sub": "system:serviceaccount:default:app",
    }
    return "{}.{}.{}".format(
        b64url(json.dumps(header).encode()),
        b64url(json.dumps(claims).encode()),
        b64url(b"not-a-real-signature"),
    )


def self_signed_certificate_pem():
    """Key + certificate PEM for CertificateCredential (cryptography ships with msal)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "azure-fake service principal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)


class Checker:
    def __init__(self, ready):
        self.ready = ready
        self.fake = Fake(ready["admin_endpoint"])
        self.ca = ready["ca_file"]
        self.vault = ready["vault_url"]
        self.passed = []
        self.failed = []
        self.skipped = []
        self._own_token_file = None

    def token_file(self):
        """The fake's --federated-token-file, or one written here when it has none."""
        if self.ready.get("federated_token_file"):
            return self.ready["federated_token_file"]
        if self._own_token_file is None:
            fd, path = tempfile.mkstemp(prefix="azure-fake-sa-")
            with os.fdopen(fd, "w") as f:
                f.write(fake_service_account_token())
            self._own_token_file = path
        return self._own_token_file

    def cleanup(self):
        if self._own_token_file:
            os.unlink(self._own_token_file)

    def run(self, name, fn):
        try:
            fn()
        except Mismatch as exc:
            self.failed.append((name, str(exc)))
            print("FAIL {}: {}".format(name, exc))
        except Exception as exc:  # the SDK raised where it should not have
            detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.failed.append((name, "unexpected {}: {}".format(type(exc).__name__, exc)))
            print("FAIL {}: unexpected {}\n{}".format(name, type(exc).__name__, detail))
        else:
            self.passed.append(name)
            print("ok   {}".format(name))
        finally:
            try:
                self.fake.clear_faults()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def skip(self, name, why):
        self.skipped.append((name, why))
        print("SKIPPED {}: {}".format(name, why))

    def client(self, credential):
        # The SDK caches the vault's challenge process-wide, per vault origin: forget it so
        # every client goes through the 401 -> token -> retry flow again.
        try:
            from azure.keyvault.secrets._shared import http_challenge_cache

            http_challenge_cache.clear()
        except ImportError:  # private module moved: the checks of the 401 count will say so
            pass
        # The challenge's resource (https://vault.azure.net) cannot match a localhost vault.
        return SecretClient(
            self.vault,
            credential,
            verify_challenge_resource=False,
            connection_verify=self.ca,
        )

    def entra_kwargs(self):
        return {"authority": self.ready["authority_host"], "connection_verify": self.ca}

    # ---------------------------------------------------------------- identities

    def check_workload_identity(self):
        token_file = self.token_file()
        with open(token_file, encoding="utf-8") as f:
            assertion = f.read()
        before = self.fake.stats()
        cred = WorkloadIdentityCredential(
            tenant_id=self.ready["tenant_id"],
            client_id=self.ready["client_id"],
            token_file_path=token_file,
            **self.entra_kwargs(),
        )
        secret = self.client(cred).get_secret("db-password")
        expect(secret.value == "s3cret", "db-password value {!r}, want 's3cret'".format(secret.value))
        after = self.fake.stats()
        expect(
            tokens(after, "workload_identity") == tokens(before, "workload_identity") + 1,
            "want exactly one workload-identity token issued, stats say {} -> {}".format(
                tokens(before, "workload_identity"), tokens(after, "workload_identity")
            ),
        )
        expect(
            responses(after, "vault_get", 401) == responses(before, "vault_get", 401) + 1,
            "the first vault request should have been answered with the 401 challenge",
        )
        expect(
            after["last_workload_assertion"] == assertion,
            "the fake saw assertion {!r}, the token file holds {!r}".format(
                after["last_workload_assertion"], assertion
            ),
        )

    def check_token_endpoint_throttle(self):
        """A fresh credential whose first token request gets a 429 must retry."""
        token_file = self.token_file()
        before = self.fake.stats()
        self.fake.inject({"kind": "throttle", "target": "token", "retry_after_secs": 1, "count": 1})
        cred = WorkloadIdentityCredential(
            tenant_id=self.ready["tenant_id"],
            client_id=self.ready["client_id"],
            token_file_path=token_file,
            **self.entra_kwargs(),
        )
        token = cred.get_token("https://vault.azure.net/.default")
        expect(token.token.count(".") == 2, "access token is not JWT-shaped: {!r}".format(token.token))
        after = self.fake.stats()
        expect(
            responses(after, "token", 429) == responses(before, "token", 429) + 1,
            "the token endpoint should have answered one 429",
        )
        expect(
            responses(after, "token", 200) == responses(before, "token", 200) + 1,
            "the SDK should have retried the 429 and got a 200",
        )

    def check_client_secret(self):
        secret_value = self.ready.get("client_secret")
        expect(secret_value, "ready.json has no client_secret: start azure-fake with --client-secret")
        before = self.fake.stats()
        cred = ClientSecretCredential(
            self.ready["tenant_id"],
            self.ready["client_id"],
            secret_value,
            # MSAL would otherwise validate the authority against login.microsoftonline.com.
            disable_instance_discovery=True,
            **self.entra_kwargs(),
        )
        secret = self.client(cred).get_secret("db-password")
        expect(secret.value == "s3cret", "db-password value {!r}".format(secret.value))
        after = self.fake.stats()
        expect(
            tokens(after, "client_secret") == tokens(before, "client_secret") + 1,
            "want one client-secret token issued",
        )
        expect(
            requests_to(after, "open_id_configuration") > requests_to(before, "open_id_configuration"),
            "MSAL should have read the OpenID discovery document",
        )

    def check_client_secret_rejected(self):
        cred = ClientSecretCredential(
            self.ready["tenant_id"],
            self.ready["client_id"],
            "definitely-not-the-secret",
            disable_instance_discovery=True,
            **self.entra_kwargs(),
        )
        try:
            cred.get_token("https://vault.azure.net/.default")
        except ClientAuthenticationError as exc:
            expect("AADSTS7000215" in str(exc), "error should carry AADSTS7000215, got: {}".format(exc))
        else:
            raise Mismatch("a wrong client secret was accepted")

    def check_wrong_tenant(self):
        token_file = self.token_file()
        cred = WorkloadIdentityCredential(
            tenant_id="00000000-0000-0000-0000-0000000000bd",
            client_id=self.ready["client_id"],
            token_file_path=token_file,
            **self.entra_kwargs(),
        )
        try:
            cred.get_token("https://vault.azure.net/.default")
        except ClientAuthenticationError as exc:
            expect("AADSTS90002" in str(exc), "error should carry AADSTS90002, got: {}".format(exc))
        else:
            raise Mismatch("a token was issued for an unknown tenant")

    def check_client_certificate(self):
        before = self.fake.stats()
        cred = CertificateCredential(
            self.ready["tenant_id"],
            self.ready["client_id"],
            certificate_data=self_signed_certificate_pem(),
            disable_instance_discovery=True,
            **self.entra_kwargs(),
        )
        secret = self.client(cred).get_secret("db-password")
        expect(secret.value == "s3cret", "db-password value {!r}".format(secret.value))
        after = self.fake.stats()
        expect(
            tokens(after, "client_certificate") == tokens(before, "client_certificate") + 1,
            "want one client-certificate token issued (JWT header with x5t / x5t#S256)",
        )

    def _with_env(self, env, fn):
        saved = {k: os.environ.get(k) for k in IDENTITY_ENV}
        try:
            for k in IDENTITY_ENV:
                os.environ.pop(k, None)
            os.environ.update(env)
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def check_imds(self):
        def run():
            before = self.fake.stats()
            # One 503 first: IMDS clients must retry 5xx.
            self.fake.inject({"kind": "status", "target": "imds", "status": 503, "count": 1})
            secret = self.client(ManagedIdentityCredential()).get_secret("db-password")
            expect(secret.value == "s3cret", "db-password value {!r}".format(secret.value))
            user_assigned = ManagedIdentityCredential(client_id=self.ready["client_id"])
            secret = self.client(user_assigned).get_secret("db-password")
            expect(secret.value == "s3cret", "db-password value {!r} (user-assigned)".format(secret.value))
            after = self.fake.stats()
            expect(
                tokens(after, "imds") == tokens(before, "imds") + 2,
                "want two IMDS tokens (system- and user-assigned), got {}".format(
                    tokens(after, "imds") - tokens(before, "imds")
                ),
            )
            expect(
                responses(after, "imds", 503) == responses(before, "imds", 503) + 1,
                "IMDS should have answered one 503",
            )

        self._with_env({"AZURE_POD_IDENTITY_AUTHORITY_HOST": self.ready["imds_endpoint"]}, run)

    def check_arc(self):
        def run():
            before = self.fake.stats()
            secret = self.client(ManagedIdentityCredential()).get_secret("db-password")
            expect(secret.value == "s3cret", "db-password value {!r}".format(secret.value))
            after = self.fake.stats()
            expect(tokens(after, "arc") == tokens(before, "arc") + 1, "want one Arc token issued")
            expect(
                responses(after, "arc", 401) >= responses(before, "arc", 401) + 1,
                "the SDK should have gone through the 401 key-file challenge",
            )

        self._with_env(
            {
                "IDENTITY_ENDPOINT": self.ready["arc_identity_endpoint"],
                "IMDS_ENDPOINT": self.ready["imds_endpoint"],
            },
            run,
        )

    # ---------------------------------------------------------------- vault

    def secret_client(self):
        cred = ClientSecretCredential(
            self.ready["tenant_id"],
            self.ready["client_id"],
            self.ready["client_secret"],
            disable_instance_discovery=True,
            **self.entra_kwargs(),
        )
        return self.client(cred)

    def check_vault_operations(self):
        client = self.secret_client()
        # Unique per run, so the version count is known even against a reused fake.
        rotating = "rotating-" + os.urandom(4).hex()

        # First request of a fresh client is a PUT: the SDK sends it without body and token,
        # gets the 401 challenge, then resends it with both.
        before = self.fake.stats()
        v1 = client.set_secret(rotating, "one").properties.version
        after = self.fake.stats()
        expect(
            responses(after, "vault_set", 401) == responses(before, "vault_set", 401) + 1,
            "the first PUT should have been answered with the 401 challenge",
        )
        expect(client.get_secret(rotating).value == "one", "PUT body lost across the challenge")

        got = client.get_secret("db-password")
        expect(got.value == "s3cret", "value {!r}".format(got.value))
        expect(got.properties.content_type == "text/plain", "contentType {!r}".format(got.properties.content_type))
        expect(got.properties.enabled is True, "enabled {!r}".format(got.properties.enabled))
        expect(
            got.properties.recovery_level == "Recoverable+Purgeable",
            "recoveryLevel {!r}".format(got.properties.recovery_level),
        )
        expect(got.properties.created_on is not None, "created missing")
        version = got.properties.version
        expect(
            version is not None and len(version) == 32 and all(c in "0123456789abcdef" for c in version),
            "version {!r} is not 32 hex chars".format(version),
        )
        expect(
            got.id == "{}/secrets/db-password/{}".format(self.vault, version),
            "id {!r}".format(got.id),
        )

        # Versions: three of them, listed two per page so nextLink is followed.
        v2 = client.set_secret(rotating, "two").properties.version
        v3 = client.set_secret(rotating, "three", content_type="text/plain", tags={"env": "test"}).properties.version
        expect(len({v1, v2, v3}) == 3, "set_secret should make a new version each time")
        expect(client.get_secret(rotating, v1).value == "one", "get by version v1")
        expect(client.get_secret(rotating, v2).value == "two", "get by version v2")
        latest = client.get_secret(rotating)
        expect(latest.value == "three", "latest value {!r}".format(latest.value))
        expect(latest.properties.version == v3, "latest version {!r} != {!r}".format(latest.properties.version, v3))
        expect(latest.properties.tags == {"env": "test"}, "tags {!r}".format(latest.properties.tags))
        expect(latest.properties.content_type == "text/plain", "contentType {!r}".format(latest.properties.content_type))
        before = self.fake.stats()
        listed = sorted(p.version for p in client.list_properties_of_secret_versions(rotating, max_page_size=2))
        expect(listed == sorted([v1, v2, v3]), "versions listed {!r}, want {!r}".format(listed, sorted([v1, v2, v3])))
        after = self.fake.stats()
        pages = requests_to(after, "vault_list_versions") - requests_to(before, "vault_list_versions")
        expect(pages == 2, "want 2 pages of versions (maxresults=2, 3 versions), the SDK fetched {}".format(pages))

        names = {p.name for p in client.list_properties_of_secrets()}
        expect({"db-password", rotating, "tls-cert"} <= names, "listed secrets {!r}".format(sorted(names)))

        cert = client.get_secret("tls-cert")
        expect(cert.properties.managed is True, "certificate-backed secret should be managed")
        expect(
            cert.properties.key_id == "{}/keys/tls-cert/{}".format(self.vault, cert.properties.version),
            "kid {!r}".format(cert.properties.key_id),
        )

    def check_not_found(self):
        client = self.secret_client()
        try:
            client.get_secret("does-not-exist")
        except ResourceNotFoundError as exc:
            expect(exc.status_code == 404, "status {}".format(exc.status_code))
            code = getattr(exc.error, "code", None)
            expect(code == "SecretNotFound", "error code {!r}".format(code))
        else:
            raise Mismatch("a missing secret did not raise ResourceNotFoundError")

    def check_forbidden(self):
        client = self.secret_client()
        self.fake.set_secret("locked", "nope")
        self.fake.forbid("locked")
        try:
            client.get_secret("locked")
        except HttpResponseError as exc:
            expect(exc.status_code == 403, "status {}".format(exc.status_code))
            code = getattr(exc.error, "code", None)
            expect(code == "Forbidden", "error code {!r}".format(code))
            inner = getattr(getattr(exc.error, "innererror", None), "get", lambda *_: None)("code")
            if inner is not None:
                expect(inner == "ForbiddenByRbac", "innererror code {!r}".format(inner))
        else:
            raise Mismatch("a forbidden secret was returned")

    def check_throttle(self):
        client = self.secret_client()
        client.get_secret("db-password")  # token cached: the throttled requests are authenticated
        before = self.fake.stats()
        self.fake.inject({"kind": "throttle", "target": "vault", "retry_after_secs": 1, "count": 2})
        started = time.monotonic()
        got = client.get_secret("db-password")
        elapsed = time.monotonic() - started
        expect(got.value == "s3cret", "value after throttling {!r}".format(got.value))
        after = self.fake.stats()
        expect(
            responses(after, "vault_get", 429) == responses(before, "vault_get", 429) + 2,
            "want two 429s answered",
        )
        expect(elapsed >= 1.8, "the SDK retried after {:.2f}s; Retry-After: 1 twice asks for >= 2s".format(elapsed))

    def check_transient_vault_error(self):
        client = self.secret_client()
        client.get_secret("db-password")
        before = self.fake.stats()
        self.fake.inject({"kind": "status", "target": "vault", "status": 503, "count": 1})
        got = client.get_secret("db-password")
        expect(got.value == "s3cret", "value after a 503 {!r}".format(got.value))
        after = self.fake.stats()
        expect(responses(after, "vault_get", 503) == responses(before, "vault_get", 503) + 1, "want one 503")


def main():
    if len(sys.argv) != 2:
        print("usage: check_sdk.py STATE_DIR/ready.json", file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        ready = json.load(f)
    # Never send the fake's traffic through a proxy from the environment.
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(x for x in [os.environ.get(var, ""), "localhost", "127.0.0.1"] if x)
    for k in IDENTITY_ENV:
        os.environ.pop(k, None)

    c = Checker(ready)
    c.run("workload identity (WorkloadIdentityCredential) -> get_secret", c.check_workload_identity)
    c.run("workload identity: token endpoint 429 is retried", c.check_token_endpoint_throttle)
    c.run("service principal secret (ClientSecretCredential, MSAL) -> get_secret", c.check_client_secret)
    c.run("service principal secret: wrong secret -> AADSTS7000215", c.check_client_secret_rejected)
    c.run("wrong tenant -> AADSTS90002", c.check_wrong_tenant)
    c.run("service principal certificate (CertificateCredential, MSAL) -> get_secret", c.check_client_certificate)
    c.run("IMDS (ManagedIdentityCredential, system + user assigned, 503 retried) -> get_secret", c.check_imds)
    if os.path.realpath(ready["arc_key_dir"]) == ARC_SDK_KEY_DIR:
        c.run("Azure Arc HIMDS (ManagedIdentityCredential, key-file challenge) -> get_secret", c.check_arc)
    else:
        c.skip(
            "Azure Arc HIMDS",
            "the SDK only reads Arc key files from {} on Linux, but the fake writes them to {} "
            "(start it with --arc-key-dir {} to run this check)".format(
                ARC_SDK_KEY_DIR, ready["arc_key_dir"], ARC_SDK_KEY_DIR
            ),
        )
    c.run("vault: get, versions (paged), set, list, certificate-backed", c.check_vault_operations)
    c.run("vault: 404 -> ResourceNotFoundError(SecretNotFound)", c.check_not_found)
    c.run("vault: 403 -> HttpResponseError(Forbidden)", c.check_forbidden)
    c.run("vault: 429 with Retry-After is retried", c.check_throttle)
    c.run("vault: 503 is retried", c.check_transient_vault_error)

    c.cleanup()
    print(
        "check_sdk: {} passed, {} failed, {} skipped".format(
            len(c.passed), len(c.failed), len(c.skipped)
        )
    )
    for name, why in c.failed:
        print("  FAILED {}: {}".format(name, why))
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
