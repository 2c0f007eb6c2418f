#!/usr/bin/env python3
"""Calls tokenbroker's GetIdpToken over mutual TLS and handles each status code
the way the broker's contract (README "Status codes and reasons") says:

- OK: prints the provider and a fingerprint of the token, never the token.
- UNAVAILABLE: retried, waiting the google.rpc.RetryInfo delay when the broker
  sent one (Auth0 said how long), else an exponential backoff with jitter;
  at most --attempts attempts.
- Everything else is not retried: INVALID_ARGUMENT, PERMISSION_DENIED,
  NOT_FOUND, FAILED_PRECONDITION (the user must sign in again, or an operator
  must fix the broker: retrying cannot help) and DEADLINE_EXCEEDED.

Programs switch on the google.rpc.ErrorInfo reason every error carries
(domain "tokenbroker"), not on the message: USER_MUST_RECONNECT and
TOKEN_EXPIRED mean "send the user through the connection's login again" and
are never retried; BROKER_MISCONFIGURED pages the broker's operator.

The stubs are generated at run time from ../../proto into a temporary
directory, so nothing generated is checked in:

    pip install -r examples/python/requirements.txt
    python3 examples/python/client.py --target 127.0.0.1:50051 \
        --ca .tokenbroker-dev/ca.pem --cert .tokenbroker-dev/client.pem \
        --key .tokenbroker-dev/client.key --user-id 'github|1234567' --provider github

Exit codes: 0 token received, 1 the broker refused or failed, 2 bad usage or
unreadable files.
"""

import argparse
import hashlib
import importlib
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto"
PROTO_FILE = "tokenbroker/v1/tokenbroker.proto"

# Longest RetryInfo delay this client sits out; a longer one is reported instead.
MAX_RETRY_DELAY = 30.0

# What to do for the ErrorInfo reasons a program acts on; the rest fall back to the code.
REASON_ADVICE = {
    "USER_MUST_RECONNECT": "the user must connect that account again (sign in through the connection); never retried",
    "TOKEN_EXPIRED": "the stored token has expired and the broker cannot refresh it: the user must sign in again; never retried",
    "TOKEN_NOT_STORED": "Auth0 holds no token for that identity: the user must sign in through it (or the connection keeps tokens in Token Vault)",
    "BROKER_MISCONFIGURED": "the broker's operator must fix its Auth0 or connection settings; retrying cannot help",
    "CALLER_UNKNOWN": "this client's certificate is not in the broker's policy; ask its operator to add the caller id",
    "PROVIDER_NOT_ALLOWED": "this client may not have that provider's tokens; ask the broker's operator to extend the policy",
}

# What to tell the user for each code that is not retried.
ADVICE = {
    grpc.StatusCode.INVALID_ARGUMENT: "the request is malformed (check --user-id); do not retry it unchanged",
    grpc.StatusCode.PERMISSION_DENIED: "this client's certificate identity may not have that; ask the broker's operator to extend the policy",
    grpc.StatusCode.NOT_FOUND: "no such user, or the user has no identity with that provider/connection",
    grpc.StatusCode.FAILED_PRECONDITION: "retrying will not help: the user must sign in again, or the broker's operator must fix its Auth0 application",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the broker did not answer within --timeout; try again later or with a longer timeout",
    grpc.StatusCode.UNAVAILABLE: "the broker or Auth0 stayed unavailable; if this happens at once on every attempt, check --target, the CA and the client certificate (a rejected certificate fails the TLS handshake, which gRPC reports as UNAVAILABLE)",
}


def load_stubs():
    """Generates the Python modules for the proto into a temporary directory
    and imports them."""
    out = Path(tempfile.mkdtemp(prefix="tokenbroker-stubs-"))
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"error: cannot generate stubs from {PROTO_ROOT / PROTO_FILE}")
    sys.path.insert(0, str(out))
    pb2 = importlib.import_module("tokenbroker.v1.tokenbroker_pb2")
    pb2_grpc = importlib.import_module("tokenbroker.v1.tokenbroker_pb2_grpc")
    return pb2, pb2_grpc


def fingerprint(token: str) -> str:
    """Enough to recognise a token in a log, not enough to use it."""
    digest = hashlib.sha256(token.encode()).hexdigest()[:12]
    return f"{token[:4]}… ({len(token)} chars, sha256 {digest})"


def retry_delay(error: grpc.RpcError):
    """The google.rpc.RetryInfo delay in seconds, or None when the broker sent none."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def error_reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason (domain tokenbroker), or "" when absent."""
    status = rpc_status.from_call(error)
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == "tokenbroker":
                return info.reason
    return ""


def backoff(attempt: int) -> float:
    """0.25 s, 0.5 s, 1 s, ... with 50-100 % jitter, capped at 5 s."""
    return min(0.25 * 2 ** (attempt - 1), 5.0) * random.uniform(0.5, 1.0)


def read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        print(f"error: cannot read {path}: {e.strerror}", file=sys.stderr)
        raise SystemExit(2)


def main() -> int:
    parser = argparse.ArgumentParser(description="Ask tokenbroker for a user's IdP token.")
    parser.add_argument("--target", required=True, help="host:port of the broker's mTLS listener")
    parser.add_argument("--ca", required=True, help="PEM CA that signed the broker's certificate")
    parser.add_argument("--cert", required=True, help="PEM client certificate")
    parser.add_argument("--key", required=True, help="PEM key of the client certificate")
    parser.add_argument(
        "--user-id", default="", help="Auth0 user id, e.g. 'github|1234567' (optional with --id-token)"
    )
    parser.add_argument(
        "--id-token",
        default="",
        help="the signed-in user's Auth0 ID token: only that user's tokens are released",
    )
    parser.add_argument("--provider", default="", help="identity provider, e.g. github")
    parser.add_argument("--connection", default="", help="Auth0 connection, when --provider is not given")
    parser.add_argument("--server-name", default="", help="name to verify the broker's certificate against, if not the target host")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each attempt, seconds (default 5)")
    parser.add_argument("--attempts", type=int, default=4, help="attempts when UNAVAILABLE (default 4)")
    args = parser.parse_args()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    options = [("grpc.lb_policy_name", "round_robin")]
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))

    pb2, pb2_grpc = load_stubs()
    request = pb2.GetIdpTokenRequest(
        user_id=args.user_id,
        provider=args.provider,
        connection=args.connection,
        id_token=args.id_token,
    )
    with grpc.secure_channel(args.target, credentials, options=options) as channel:
        stub = pb2_grpc.TokenBrokerStub(channel)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = stub.GetIdpToken(request, timeout=args.timeout)
                break
            except grpc.RpcError as error:
                code = error.code()
                if code != grpc.StatusCode.UNAVAILABLE or attempt >= args.attempts:
                    return report(error, attempt)
                delay = retry_delay(error)
                if delay is None:
                    delay, why = backoff(attempt), "backoff"
                elif delay > MAX_RETRY_DELAY:
                    return report(error, attempt)
                else:
                    why = "RetryInfo"
                print(
                    f"UNAVAILABLE ({error.details()}); retrying in {delay:.2f}s ({why}), attempt {attempt + 1}/{args.attempts}",
                    file=sys.stderr,
                )
                time.sleep(delay)

    token = response.token
    print(f"provider:    {token.provider}")
    print(f"connection:  {token.connection}")
    print(f"idp_user_id: {token.idp_user_id}")
    print(f"token:       {fingerprint(token.access_token)}")
    if token.access_token_secret:
        print(f"secret:      {fingerprint(token.access_token_secret)}")
    if token.HasField("expires_at"):
        print(f"expires_at:  {token.expires_at.ToJsonString()}")
    if token.HasField("fetched_at"):
        print(f"fetched_at:  {token.fetched_at.ToJsonString()}")
    print(f"from_cache:  {str(token.from_cache).lower()}")
    return 0


def report(error: grpc.RpcError, attempts: int) -> int:
    code = error.code()
    reason = error_reason(error)
    shown = f"{code.name} ({reason})" if reason else code.name
    print(f"error: {shown} after {attempts} attempt(s): {error.details()}", file=sys.stderr)
    advice = REASON_ADVICE.get(reason) or ADVICE.get(code)
    if advice:
        print(f"  {advice}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
