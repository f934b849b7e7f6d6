"""Bearer-token auth and (mutual) TLS on a real server; health checks need no token and have
a plaintext port of their own; reflection answers v1 and v1alpha."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from indexer.errors import InvalidInputError
from server.app import InfluenceServer, ServerConfig
from server.auth import SecurityConfig, load_token
from server.client import InfluenceClient
from server.reflection import V1_SERVICE_NAME, v1_message_class
from tests.server_fakes import FakeOpener, publish, running_server

TOKEN = "s3cret-token"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    publish(tmp_path / "index", "v1")
    return tmp_path / "index"


def code_of(client: InfluenceClient) -> grpc.StatusCode:
    try:
        client.query("The cat", " sat")
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_token_required_except_for_health(root: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running_server(root, FakeOpener(), auth_token_file=token_file) as (server, _):
        target = f"127.0.0.1:{server.port}"
        with InfluenceClient(target, token=TOKEN) as good:
            assert code_of(good) == grpc.StatusCode.OK
        with InfluenceClient(target, token="wrong") as wrong:
            assert code_of(wrong) == grpc.StatusCode.UNAUTHENTICATED
        with InfluenceClient(target) as anonymous:
            assert code_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.health() == "SERVING"
        with grpc.insecure_channel(target) as channel:
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_auth_is_off_by_default_and_reflection_lists_the_service(root: Path) -> None:
    with running_server(root, FakeOpener()) as (server, client):
        assert code_of(client) == grpc.StatusCode.OK
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            services = {s.name for s in next(stream).list_services_response.service}
    assert {"influence.v1.InfluenceService", "grpc.health.v1.Health"} <= services


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFLUENCE_TOKEN", TOKEN)
    assert load_token(token_env="INFLUENCE_TOKEN") == TOKEN
    assert load_token() is None
    monkeypatch.setenv("INFLUENCE_TOKEN", "  ")
    with pytest.raises(InvalidInputError, match="INFLUENCE_TOKEN"):
        load_token(token_env="INFLUENCE_TOKEN")
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_token(tmp_path / "missing")


def test_incomplete_tls_settings_are_refused(root: Path, tmp_path: Path) -> None:
    security = SecurityConfig(tls_cert_file=tmp_path / "cert.pem")
    config = ServerConfig(index_root=root, port=0, security=security)
    with pytest.raises(InvalidInputError, match="--tls-key"):
        InfluenceServer(config, opener=FakeOpener()).start()


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _issue(directory: Path, name: str, subject: str, ca: str | None, san: str | None) -> None:
    """EC key and certificate NAME.{key,pem}, signed by CA (self-signed if None)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    if ca is None:
        _openssl("req", "-x509", "-new", "-key", key, "-subj", subject, "-days", "2", "-out", cert)
        return
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("req", "-new", "-key", key, "-subj", subject, "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", directory / f"{ca}.pem", "-CAkey",
        directory / f"{ca}.key", "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", cert,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("pki")
    _issue(directory, "ca", "/CN=test-ca", None, None)
    _issue(directory, "server", "/CN=localhost", "ca", "DNS:localhost,IP:127.0.0.1")
    _issue(directory, "client", "/CN=client", "ca", None)
    return directory


def test_tls_and_mutual_tls(root: Path, pki: Path) -> None:
    tls = {"tls_cert_file": pki / "server.pem", "tls_key_file": pki / "server.key"}
    with running_server(root, FakeOpener(), **tls) as (server, _):
        target = f"localhost:{server.port}"
        with InfluenceClient(target, tls_ca_file=pki / "ca.pem") as client:
            assert code_of(client) == grpc.StatusCode.OK
        with InfluenceClient(target) as plaintext:
            assert code_of(plaintext) == grpc.StatusCode.UNAVAILABLE
    mutual = tls | {"tls_client_ca_file": pki / "ca.pem"}
    with running_server(root, FakeOpener(), **mutual) as (server, _):
        target = f"localhost:{server.port}"
        with InfluenceClient(target, tls_ca_file=pki / "ca.pem", timeout_s=5) as no_cert:
            assert code_of(no_cert) == grpc.StatusCode.UNAVAILABLE
        with InfluenceClient(
            target,
            tls_ca_file=pki / "ca.pem",
            tls_cert_file=pki / "client.pem",
            tls_key_file=pki / "client.key",
        ) as client:
            assert code_of(client) == grpc.StatusCode.OK


def test_reflection_v1_answers_real_v1_requests(root: Path) -> None:
    request_class = v1_message_class("ServerReflectionRequest")
    response_class = v1_message_class("ServerReflectionResponse")
    requests = [
        request_class(list_services=""),
        request_class(file_containing_symbol="influence.v1.InfluenceService"),
        request_class(file_containing_symbol=V1_SERVICE_NAME),
    ]
    with (
        running_server(root, FakeOpener()) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        info = channel.stream_stream(
            f"/{V1_SERVICE_NAME}/ServerReflectionInfo",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        listed, influence, reflection_v1 = list(info(iter(requests), timeout=5))
    services = {s.name for s in listed.list_services_response.service}
    assert {"influence.v1.InfluenceService", V1_SERVICE_NAME, reflection.SERVICE_NAME} <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(f)
        for f in influence.file_descriptor_response.file_descriptor_proto
    ]
    assert "influence/v1/influence.proto" in {f.name for f in files}
    (described,) = (
        descriptor_pb2.FileDescriptorProto.FromString(f)
        for f in reflection_v1.file_descriptor_response.file_descriptor_proto
    )
    assert described.package == "grpc.reflection.v1"


def test_health_port_is_plaintext_while_the_main_port_uses_tls(root: Path, pki: Path) -> None:
    tls = {"tls_cert_file": pki / "server.pem", "tls_key_file": pki / "server.key"}
    with running_server(root, FakeOpener(), health_port=0, **tls) as (server, _):
        with InfluenceClient(f"127.0.0.1:{server.health_port}", timeout_s=5) as probe:
            assert probe.health() == "SERVING"
            assert probe.health("liveness") == "SERVING"
        with InfluenceClient(f"127.0.0.1:{server.port}", timeout_s=5) as plaintext:
            assert code_of(plaintext) == grpc.StatusCode.UNAVAILABLE
