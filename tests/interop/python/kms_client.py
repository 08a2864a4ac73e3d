#!/usr/bin/env python3
"""An independent KMS client: Python grpcio over unix://, with the apiserver's checks.

grpcio (gRPC's C core) is a second gRPC implementation that shares nothing with the
plugin's tonic/h2 stack or with grpc-go. By default it dials `unix://SOCKET` and lets
grpcio choose the :authority (what a user's first script does); --authority sets one.

The KMS protos are compiled at start with grpcio-tools (its bundled protoc) into a
temporary directory. Needs: pip install -r tests/requirements.txt

Usage: kms_client.py --socket PATH [--authority VALUE] [--rounds N] [--checks health,v2,v1beta1]
Prints one JSON line of what it did; exits 1 with the first failed check.
"""

import argparse
import concurrent.futures
import importlib
import json
import os
import re
import sys
import tempfile
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

# kube-apiserver's limits (k8s.io/apiserver kmsv2).
MAX_KEY_ID = 1024
MAX_CIPHERTEXT = 1024
MAX_ANNOTATION_BYTES = 32 * 1024
CALL_TIMEOUT = 3.0
LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
SUBDOMAIN = re.compile(rf"^{LABEL}(\.{LABEL})+$")
PROTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "proto", "kms")


def fail(msg):
    print(f"kms_client.py: {msg}", file=sys.stderr)
    sys.exit(1)


def compile_protos():
    out = tempfile.mkdtemp(prefix="kms-protos-")
    for name in ("v2.proto", "v1beta1.proto"):
        rc = protoc.main(["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}", name])
        if rc != 0:
            fail(f"compiling {name} with grpcio-tools failed ({rc})")
    sys.path.insert(0, out)
    mods = {n: importlib.import_module(n) for n in ("v2_pb2", "v2_pb2_grpc", "v1beta1_pb2", "v1beta1_pb2_grpc")}
    return mods


def check_key_id(where, key_id):
    if not key_id:
        fail(f"{where}: key_id is empty")
    if len(key_id.encode()) > MAX_KEY_ID:
        fail(f"{where}: key_id is longer than {MAX_KEY_ID} bytes")


def check_annotations(annotations):
    total = 0
    for k, v in annotations.items():
        if len(k) > 253 or not SUBDOMAIN.match(k):
            fail(f"Encrypt: annotation key {k!r} is not a DNS-1123 subdomain of at least two labels")
        total += len(k.encode()) + len(v)
    if total > MAX_ANNOTATION_BYTES:
        fail(f"Encrypt: annotations are {total} bytes, more than {MAX_ANNOTATION_BYTES}")


def status(pb, stub):
    r = stub.Status(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    if r.healthz != "ok":
        fail(f"Status: healthz {r.healthz!r}, want 'ok'")
    if r.version not in ("v2", "v2beta1"):
        fail(f"Status: version {r.version!r}, want v2 or v2beta1")
    check_key_id("Status", r.key_id)
    return r


def round_trip(pb, stub, key_id):
    seed = os.urandom(32)
    enc = stub.Encrypt(pb.EncryptRequest(plaintext=seed, uid=str(uuid.uuid4())), timeout=CALL_TIMEOUT)
    if not 0 < len(enc.ciphertext) <= MAX_CIPHERTEXT:
        fail(f"Encrypt: ciphertext of {len(enc.ciphertext)} bytes, want 1..{MAX_CIPHERTEXT}")
    check_key_id("Encrypt", enc.key_id)
    if enc.key_id != key_id:
        fail(f"Encrypt: key_id {enc.key_id!r} differs from Status' {key_id!r}")
    check_annotations(enc.annotations)
    dec = stub.Decrypt(
        pb.DecryptRequest(ciphertext=enc.ciphertext, uid=str(uuid.uuid4()), key_id=enc.key_id,
                          annotations=dict(enc.annotations)),
        timeout=CALL_TIMEOUT,
    )
    if dec.plaintext != seed:
        fail("Decrypt: plaintext differs from the seed encrypted")
    return enc


def check_v2(mods, channel, rounds):
    pb, stub = mods["v2_pb2"], mods["v2_pb2_grpc"].KeyManagementServiceStub(channel)
    first = status(pb, stub)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: round_trip(pb, stub, first.key_id), range(rounds)))
    tampered = bytearray(results[0].ciphertext)
    tampered[-1] ^= 1
    try:
        stub.Decrypt(pb.DecryptRequest(ciphertext=bytes(tampered), uid=str(uuid.uuid4()),
                                       key_id=results[0].key_id, annotations=dict(results[0].annotations)),
                     timeout=CALL_TIMEOUT)
        fail("Decrypt of a tampered ciphertext succeeded")
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.OK:
            fail("Decrypt of a tampered ciphertext returned OK")
    if status(pb, stub).key_id != first.key_id:
        fail("Status: key_id changed during the run")
    return first


def check_v1(mods, channel):
    pb, stub = mods["v1beta1_pb2"], mods["v1beta1_pb2_grpc"].KeyManagementServiceStub(channel)
    v = stub.Version(pb.VersionRequest(version="v1beta1"), timeout=CALL_TIMEOUT)
    if v.version != "v1beta1":
        fail(f"v1beta1 Version: {v.version!r}, want 'v1beta1'")
    if not v.runtime_name or not v.runtime_version:
        fail("v1beta1 Version: empty runtime name or version")
    n = 20
    for _ in range(n):
        plain = os.urandom(32)
        enc = stub.Encrypt(pb.EncryptRequest(version="v1beta1", plain=plain), timeout=CALL_TIMEOUT)
        if not enc.cipher:
            fail("v1beta1 Encrypt: empty cipher")
        dec = stub.Decrypt(pb.DecryptRequest(version="v1beta1", cipher=enc.cipher), timeout=CALL_TIMEOUT)
        if dec.plain != plain:
            fail("v1beta1 Decrypt: plaintext differs")
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--authority", help="send this :authority instead of grpcio's default")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--checks", default="health,v2")
    args = ap.parse_args()
    mods = compile_protos()
    options = [("grpc.default_authority", args.authority)] if args.authority is not None else []
    target = "unix:" + args.socket if args.socket.startswith("@") else "unix://" + os.path.abspath(args.socket)
    out = {"target": target, "authority": args.authority or "(grpcio default)", "grpcio_version": grpc.__version__}
    try:
        with grpc.insecure_channel(target, options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            for check in args.checks.split(","):
                if check == "health":
                    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
                    if r.status != health_pb2.HealthCheckResponse.SERVING:
                        fail(f"grpc.health.v1.Health/Check: status {r.status}, want SERVING")
                    out["health"] = "SERVING"
                elif check == "v2":
                    s = check_v2(mods, channel, args.rounds)
                    out.update(key_id=s.key_id, status_version=s.version, round_trips=args.rounds)
                elif check == "v1beta1":
                    out["v1beta1_round_trips"] = check_v1(mods, channel)
                else:
                    fail(f"unknown check {check!r}")
    except grpc.RpcError as e:
        fail(f"{e.code().name}: {e.details()}")
    except grpc.FutureTimeoutError:
        fail(f"could not connect to {target} within 10 s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
