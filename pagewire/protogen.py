"""Generate the Python stubs in ``pagewire/v1`` from ``protos/``.

The stubs are checked in so that installing pagewire needs no protoc; a test regenerates them into
a temporary folder and fails when the checked-in copies are stale. Run ``python -m pagewire.protogen``
after editing a ``.proto`` file.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTO_FILES = ("common", "generation", "scheduler", "worker")
INIT = '"""Generated protobuf and gRPC stubs for pagewire.v1 (do not edit; see pagewire.protogen)."""\n'


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) for every proto file; return the files written under out_root."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(PROTO_ROOT / "pagewire" / "v1" / f"{name}.proto") for name in PROTO_FILES]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    package = out_root / "pagewire" / "v1"
    (package / "__init__.py").write_text(INIT)
    return sorted(p for p in package.iterdir() if p.is_file())


if __name__ == "__main__":
    written = generate(REPO)
    print("\n".join(str(p.relative_to(REPO)) for p in written), file=sys.stdout)
