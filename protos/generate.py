"""Regenerate the checked-in Python modules from protos/influence/v1/influence.proto.

Usage: python protos/generate.py [OUT_DIR]   (default: protos/, in place)
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "influence/v1/influence.proto"


def generate(out_dir: Path = PROTO_ROOT) -> None:
    """Write influence_pb2.py, .pyi and _pb2_grpc.py under OUT_DIR/influence/v1/."""
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
