#!/usr/bin/env python3
"""Checks every YAML document under deploy/ offline, with no cluster and no network.

    python3 deploy/validate.py          (needs: pip install -r tests/requirements.txt)

`cargo test` runs it (tests/deploy_manifests.rs). For each document:

1. It parses as YAML, and no mapping repeats a key (PyYAML would silently keep the last
   one; kubectl rejects the file).
2. Kubernetes API objects validate against the strict JSON schemas that kubernetes-validate
   ships (unknown fields are errors, so a typo is not silently dropped), for every
   Kubernetes minor version from MIN_KUBERNETES to the newest the package knows. 1.29 is
   where KMS v2 is GA and native sidecars (init containers with restartPolicy: Always) are
   on by default; the 1.27 schema rejects such an init container.
3. EncryptionConfiguration (apiserver.config.k8s.io/v1) is kube-apiserver's config file,
   not an API object, so kubernetes-validate has no schema for it (it only warns). It is
   checked against ENCRYPTION_CONFIGURATION_SCHEMA below, written from the v1 types and the
   apiserver's validation rules. tests/deploy_manifests.rs further compares it with the
   plugin's defaults.
4. A ConfigMap value whose key ends in .yaml/.yml (a config file mounted into a container)
   must parse as YAML too; the sidecar's own tests check what it says.

Exit status: 0 all valid, 1 something is invalid, 3 a Python module is missing.
"""

import pathlib
import sys

try:
    import jsonschema
    import kubernetes_validate
    import kubernetes_validate.utils
    import yaml
except ImportError as e:
    print(
        f"deploy/validate.py needs the Python module {e.name!r}: "
        "pip install -r tests/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(3)

MIN_KUBERNETES = "1.29"
DEPLOY = pathlib.Path(__file__).resolve().parent

# A Go duration as metav1.Duration parses it: "3s", "1m30s", "500ms".
GO_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"

_KEYS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["keys"],
    "properties": {
        "keys": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "secret"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "secret": {"type": "string", "minLength": 1},
                },
            },
        }
    },
}

# The shape of k8s.io/apiserver/pkg/apis/apiserver/v1 EncryptionConfiguration, with the
# structural rules of kube-apiserver's validation: at least one resource entry, each with
# resources and providers; each provider sets exactly one kind; kms needs a name and a
# unix:// endpoint, and its apiVersion is v1 or v2. The rules that depend on the kms
# apiVersion are in kms_rules().
ENCRYPTION_CONFIGURATION_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "apiserver.config.k8s.io/v1"},
        "kind": {"const": "EncryptionConfiguration"},
        "resources": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["resources", "providers"],
                "properties": {
                    "resources": {
                        "type": "array",
                        "minItems": 1,
                        "uniqueItems": True,
                        # "secrets", "configmaps", "deployments.apps", "*.apps", "*.*"
                        "items": {
                            "type": "string",
                            "pattern": r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.(\*|[a-z0-9]([-a-z0-9.]*[a-z0-9])?))?$",
                        },
                    },
                    "providers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "minProperties": 1,
                            "maxProperties": 1,
                            "properties": {
                                "aesgcm": _KEYS,
                                "aescbc": _KEYS,
                                "secretbox": _KEYS,
                                "identity": {
                                    "type": "object",
                                    "additionalProperties": False,
                                },
                                "kms": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name", "endpoint"],
                                    "properties": {
                                        "apiVersion": {"enum": ["v1", "v2"]},
                                        "name": {"type": "string", "minLength": 1},
                                        "endpoint": {
                                            "type": "string",
                                            "pattern": r"^unix:///.+",
                                        },
                                        "cachesize": {"type": "integer"},
                                        "timeout": {"type": "string", "pattern": GO_DURATION},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}



def kms_rules(doc):
    """kube-apiserver's rules for kms providers that a schema would state poorly."""
    for i, res in enumerate(doc.get("resources") or []):
        for j, provider in enumerate(res.get("providers") or []):
            kms = provider.get("kms") if isinstance(provider, dict) else None
            if not isinstance(kms, dict):
                continue
            at = f"resources.{i}.providers.{j}.kms"
            version = kms.get("apiVersion", "v1")
            if version == "v1":
                yield f"{at}: apiVersion v1 (the default) is deprecated and off since Kubernetes 1.29: use v2"
            if version == "v2" and ":" in str(kms.get("name", "")):
                yield f"{at}.name: a v2 provider's name must not contain ':'"
            if version == "v2" and "cachesize" in kms:
                yield f"{at}.cachesize: not supported with apiVersion v2 (the apiserver refuses it)"
            timeout = str(kms.get("timeout", "3s"))
            if not any(c in "123456789" for c in timeout):
                yield f"{at}.timeout: {timeout!r} must be more than zero"


# (schema, extra rules) for documents that are not Kubernetes API objects.
OWN_SCHEMAS = {
    ("apiserver.config.k8s.io/v1", "EncryptionConfiguration"): (
        ENCRYPTION_CONFIGURATION_SCHEMA,
        kms_rules,
    ),
}


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def kubernetes_versions():
    def key(v):
        return tuple(int(x) for x in v.split(".")[:2])

    shipped = sorted(
        {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()},
        key=key,
    )
    return [v for v in shipped if key(v) >= key(MIN_KUBERNETES)]


def spans(some, versions):
    """The versions in `some` as runs of consecutive `versions`: "1.29 to 1.31, 1.35"."""
    runs, run = [], []
    for v in versions:
        if v in some:
            run.append(v)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]} to {r[-1]}" for r in runs)


def one_line(error):
    return " ".join(str(error).split())


def where(error):
    path = ".".join(str(p) for p in error.absolute_path)
    return f"{path}: {error.message}" if path else error.message


def check_document(doc, versions):
    """Returns a list of problems (empty when the document is valid)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["not a Kubernetes object (no apiVersion and kind)"]
    own = OWN_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if own is not None:
        schema, rules = own
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            return [f"{where(e)} (schema in deploy/validate.py)" for e in errors]
        return list(rules(doc))
    # The same problem in several versions is reported once, with the versions it has.
    by_problem = {}
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problem = (
                f"no schema for {doc['apiVersion']} {doc['kind']} in kubernetes-validate: "
                "not a built-in Kubernetes kind (a CRD?); give it a schema in OWN_SCHEMAS"
            )
            by_problem.setdefault(problem, []).append(version)
        except kubernetes_validate.ValidationError as e:
            by_problem.setdefault(where(e), []).append(version)
    problems = [f"Kubernetes {spans(vs, versions)}: {p}" for p, vs in by_problem.items()]
    if doc["kind"] == "ConfigMap":
        for key, value in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                try:
                    list(yaml.load_all(value, Loader=UniqueKeyLoader))
                except yaml.YAMLError as e:
                    problems.append(f"data.{key} is not valid YAML: {one_line(e)}")
    return problems


def main():
    versions = kubernetes_versions()
    if not versions:
        print(
            f"kubernetes-validate {kubernetes_validate.__version__} ships no schema for "
            f"Kubernetes {MIN_KUBERNETES} or later: pip install -r tests/requirements.txt",
            file=sys.stderr,
        )
        return 3
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    if not files:
        print(f"no YAML file under {DEPLOY}", file=sys.stderr)
        return 1
    valid = invalid = bad_files = 0
    for path in files:
        rel = path.relative_to(DEPLOY.parent)
        try:
            docs = yaml.load_all(path.read_text(), Loader=UniqueKeyLoader)
            docs = [d for d in docs if d is not None]
        except yaml.YAMLError as e:
            print(f"FAIL {rel}: not valid YAML: {one_line(e)}")
            bad_files += 1
            continue
        if not docs:
            print(f"FAIL {rel}: no YAML document in it")
            bad_files += 1
            continue
        for doc in docs:
            name = "?"
            if isinstance(doc, dict):
                name = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '-')}"
            problems = check_document(doc, versions)
            for p in problems:
                print(f"FAIL {rel} {name}: {p}")
            if problems:
                invalid += 1
            else:
                valid += 1
                print(f"ok   {rel} {name}")
    print(
        f"deploy/: {len(files)} YAML files, {valid} documents valid, {invalid} invalid, "
        f"{bad_files} files unparsable (Kubernetes {versions[0]} to {versions[-1]}, strict "
        f"schemas, kubernetes-validate {kubernetes_validate.__version__})"
    )
    return 1 if invalid or bad_files else 0


if __name__ == "__main__":
    sys.exit(main())
