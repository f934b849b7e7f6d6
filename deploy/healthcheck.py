#!/opt/venv/bin/python
"""Container health check: ask the server's plaintext health port for a service's status.

Installed in the images as /opt/venv/bin/influence-healthcheck. Exit 0 when the service is
SERVING, 1 otherwise (NOT_SERVING, unknown service, timeout, nothing listening).

    influence-healthcheck                       # readiness: service "" (an index is loaded)
    influence-healthcheck --service liveness    # liveness: the process is up
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="the server's --health-port")
    parser.add_argument("--service", default="", help='"" = readiness, "liveness" = liveness')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(f"{args.host}:{args.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"health {args.service!r}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"health {args.service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
