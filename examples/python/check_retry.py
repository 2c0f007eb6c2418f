#!/usr/bin/env python3
"""Checks that the example clients retry UNAVAILABLE after the RetryInfo delay
and do not retry FAILED_PRECONDITION, against a stand-in broker (`tokenbroker
dev` cannot be made to fail on demand). Uses the dev PKI that `tokenbroker dev`
wrote. CI runs it; by hand:

    python3 examples/python/check_retry.py --pki .tokenbroker-dev \
        --client 'python3 examples/python/client.py' \
        --client examples/rust-client/target/debug/tokenbroker-client-example
"""

import argparse
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

sys.path.insert(0, str(Path(__file__).resolve().parent))
import client  # noqa: E402

DELAY = 0.6
TOKEN = "gho_stand_in_token_value"


class StandIn:
    """GetIdpToken: UNAVAILABLE with RetryInfo twice, then a token; or always FAILED_PRECONDITION."""

    def __init__(self):
        self.calls = []
        self.failed_precondition = False

    def GetIdpToken(self, request, context):
        self.calls.append(time.monotonic())
        if self.failed_precondition:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Auth0 holds no access token; sign in again")
        if len(self.calls) <= 2:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(DELAY * 1e9))))
            context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=code_pb2.UNAVAILABLE, message="Auth0 rate limit; retry later", details=[detail])))
        return PB2.GetIdpTokenResponse(token=PB2.IdpToken(provider="github", access_token=TOKEN))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pki", required=True, help="directory written by `tokenbroker dev`")
    parser.add_argument("--client", action="append", required=True, help="a client command (repeatable)")
    args = parser.parse_args()
    pki = Path(args.pki)
    servicer = StandIn()
    handler = PB2_GRPC.TokenBrokerServicer()
    handler.GetIdpToken = servicer.GetIdpToken
    server = grpc.server(futures.ThreadPoolExecutor(4))
    PB2_GRPC.add_TokenBrokerServicer_to_server(handler, server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    flags = ["--target", f"127.0.0.1:{port}", "--ca", str(pki / "ca.pem"), "--cert", str(pki / "client.pem"),
             "--key", str(pki / "client.key"), "--user-id", "github|1234567", "--provider", "github"]
    failures = 0
    try:
        for command in args.client:
            argv = command.split()
            servicer.calls.clear()
            servicer.failed_precondition = False
            run = subprocess.run(argv + flags, capture_output=True, text=True, timeout=60)
            gaps = [later - earlier for earlier, later in zip(servicer.calls, servicer.calls[1:])]
            ok = (run.returncode == 0 and len(servicer.calls) == 3 and all(gap >= DELAY * 0.9 for gap in gaps)
                  and "provider:    github" in run.stdout and TOKEN not in run.stdout + run.stderr)
            print(f"{'ok  ' if ok else 'FAIL'} {command}: UNAVAILABLE+RetryInfo twice -> exit {run.returncode}, "
                  f"{len(servicer.calls)} calls, gaps {[round(g, 2) for g in gaps]}s")
            failures += not ok
            servicer.calls.clear()
            servicer.failed_precondition = True
            run = subprocess.run(argv + flags, capture_output=True, text=True, timeout=60)
            ok = run.returncode == 1 and len(servicer.calls) == 1
            print(f"{'ok  ' if ok else 'FAIL'} {command}: FAILED_PRECONDITION -> exit {run.returncode}, "
                  f"{len(servicer.calls)} call(s)")
            failures += not ok
            if failures:
                print(run.stdout, run.stderr, file=sys.stderr)
    finally:
        server.stop(0)
    return 1 if failures else 0


if __name__ == "__main__":
    PB2, PB2_GRPC = client.load_stubs()
    sys.exit(main())
