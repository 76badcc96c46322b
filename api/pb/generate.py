"""Regenerates the Python stubs in api/pb/ from proto/goodspeed/v1/generation.proto.

Run with `make proto` (python -m api.pb.generate). The stubs are committed; a test checks
they match the proto.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("goodspeed/v1/generation.proto")
OUT = Path(__file__).resolve().parent
STUBS = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for name in STUBS:
            text = (Path(tmp) / PROTO.parent / name).read_text()
            # protoc writes absolute imports of the proto package; the stubs live in api.pb.
            text = re.sub(r"^from goodspeed\.v1 import", "from api.pb import", text, flags=re.MULTILINE)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
        return written


if __name__ == "__main__":
    for path in generate(OUT):
        print(f"wrote {path.relative_to(ROOT)}")
    sys.exit(0)
