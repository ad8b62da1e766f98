"""Generate the Python gRPC stubs next to the .proto files (``make proto``; a test checks them).

The stubs live in proto/logitcache/v1/, which is the installed package ``logitcache.v1``.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["logitcache/v1/logitcache.proto"]


def generate(out_dir: Path) -> None:
    """Write logitcache/v1/*_pb2*.py under ``out_dir`` with the installed grpcio-tools."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / f) for f in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
