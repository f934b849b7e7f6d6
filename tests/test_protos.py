"""The checked-in generated modules are what protos/generate.py makes from the .proto."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parents[1] / "protos"
GENERATED = ("influence_pb2.py", "influence_pb2.pyi", "influence_pb2_grpc.py")


def _stamped_grpc_version() -> str:
    text = (PROTOS / "influence/v1/influence_pb2_grpc.py").read_text()
    match = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", text)
    assert match, "influence_pb2_grpc.py has no GRPC_GENERATED_VERSION"
    return match.group(1)


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    installed, stamped = version("grpcio-tools"), _stamped_grpc_version()
    if installed != stamped:
        # Another protoc writes other (equally valid) code: nothing to compare against.
        pytest.skip(f"checked-in code was made by grpcio-tools {stamped}, not {installed}")
    subprocess.run([sys.executable, str(PROTOS / "generate.py"), str(tmp_path)], check=True)
    for name in GENERATED:
        fresh = (tmp_path / "influence/v1" / name).read_bytes()
        checked_in = (PROTOS / "influence/v1" / name).read_bytes()
        assert fresh == checked_in, f"{name} is stale: run `python protos/generate.py`"


def test_contract_names_and_field_numbers() -> None:
    from influence.v1 import influence_pb2, influence_pb2_grpc

    service = influence_pb2.DESCRIPTOR.services_by_name["InfluenceService"]
    assert service.full_name == "influence.v1.InfluenceService"
    methods = {m.name for m in service.methods}
    assert methods == {"Query", "QueryStream", "QueryBatch", "AttributeTokens", "GetIndexInfo"}
    assert hasattr(influence_pb2_grpc, "InfluenceServiceStub")
    request = {f.name: f.number for f in influence_pb2.QueryRequest.DESCRIPTOR.fields}
    assert (request["prompt"], request["completion"], request["top_k"]) == (1, 2, 3)
    response = {f.name: f.number for f in influence_pb2.QueryResponse.DESCRIPTOR.fields}
    assert (response["influences"], response["index_version"]) == (1, 2)
