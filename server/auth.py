"""Optional bearer-token authentication and TLS / mutual TLS credentials. Both off by default.

Clients send `authorization: Bearer <token>` metadata. Health checks stay open so that load
balancers and Kubernetes probes need no token.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from indexer.errors import InvalidInputError

HEALTH_PREFIX = "/grpc.health.v1.Health/"

HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def load_token(token_file: Path | None = None, token_env: str | None = None) -> str | None:
    """The token from a file (first) or the named environment variable; None if neither is set."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise InvalidInputError(f"cannot read the auth token file {token_file}: {exc}") from exc
        source = str(token_file)
    elif token_env is not None:
        token = os.environ.get(token_env, "").strip()
        source = f"environment variable {token_env}"
    else:
        return None
    if not token:
        raise InvalidInputError(f"the auth token from {source} is empty")
    return token


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED."""

    def __init__(
        self,
        token: str,
        *,
        exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,),
        on_denied: Callable[[str], None] | None = None,
    ) -> None:
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt_prefixes
        self._on_denied = on_denied

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(self._exempt):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        offered = metadata.get("authorization", "")
        if isinstance(offered, str):
            offered = offered.encode()
        # Constant-time comparison: response timing must not reveal a prefix of the token.
        if hmac.compare_digest(offered, self._expected):
            return handler
        if self._on_denied is not None:
            self._on_denied(method)
        message = (
            "wrong bearer token" if offered else "missing 'authorization: Bearer <token>' metadata"
        )
        return _denying_handler(handler, message)


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that aborts with UNAUTHENTICATED."""

    def deny(_request: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    factory = HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files. A client CA turns on mutual TLS: clients must present a certificate it signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class SecurityConfig:
    """A server's bearer token (from a file or an environment variable) and TLS files."""

    auth_token_file: Path | None = field(
        default=None,
        metadata={"help": "require 'authorization: Bearer <token>' with the token in this file"},
    )
    auth_token_env: str | None = field(
        default=None,
        metadata={
            "help": "as --auth-token-file, with the token in environment variable VAR",
            "metavar": "VAR",
        },
    )
    tls_cert_file: Path | None = field(
        default=None,
        metadata={"help": "server certificate chain (PEM); turns TLS on", "flags": ("--tls-cert",)},
    )
    tls_key_file: Path | None = field(
        default=None, metadata={"help": "server private key (PEM)", "flags": ("--tls-key",)}
    )
    tls_client_ca_file: Path | None = field(
        default=None,
        metadata={
            "help": "CA (PEM) that client certificates must be signed by: mutual TLS",
            "flags": ("--tls-client-ca",),
        },
    )

    def token(self) -> str | None:
        """The bearer token clients must send, or None for no authentication."""
        return load_token(self.auth_token_file, self.auth_token_env)

    def tls(self) -> TlsFiles | None:
        """The TLS files, or None for plaintext; raises InvalidInputError if incomplete."""
        if self.tls_cert_file is None and self.tls_key_file is None:
            if self.tls_client_ca_file is not None:
                raise InvalidInputError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if self.tls_cert_file is None or self.tls_key_file is None:
            raise InvalidInputError("TLS needs both --tls-cert and --tls-key")
        return TlsFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    cert, key = read_pem(tls.cert_file), read_pem(tls.key_file)
    client_ca = read_pem(tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_pem(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read TLS file {path}: {exc}") from exc
    if b"-----BEGIN " not in data:
        raise InvalidInputError(f"TLS file {path} is not PEM (no -----BEGIN line)")
    return data
