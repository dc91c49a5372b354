"""Regenerates shared/proto/ from protos/ (python, pyi stubs and grpc stubs).

Run through `make protos`. tests/unit/test_protos_drift.py runs the same generation into
a temporary folder and fails when the checked-in code differs.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "shared.proto"

# protoc names generated modules after the proto package ("cardline.common.v1.common_pb2");
# they live in the Python package shared.proto, so their imports and module names are
# rewritten into it, as temporalio's scripts/gen_protos.py does for temporalio.api.
_IMPORT = re.compile(r"^(from|import) cardline\.", re.MULTILINE)
_MODULE_NAME = re.compile(r"'(cardline\.[a-z0-9_.]+_pb2)'")


def into_package(text: str) -> str:
    """Generated code with `cardline.x.v1` imports and module names moved under shared.proto."""
    return _MODULE_NAME.sub(rf"'{PACKAGE}.\1'", _IMPORT.sub(rf"\1 {PACKAGE}.cardline.", text))


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    bindir = pathlib.Path(sys.executable).parent  # the venv's protoc-gen-mypy plugins
    args = [
        "protoc", f"-I{PROTOS}", f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}", f"--mypy_out={out}", f"--grpc_python_out={out}", f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for d in [out / "cardline", *[p for p in (out / "cardline").rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    for path in (out / "cardline").rglob("*.py*"):
        path.write_text(into_package(path.read_text()))


def main() -> None:
    target = ROOT / "shared" / "proto"
    keep = (target / "__init__.py").read_text() if (target / "__init__.py").exists() else None
    shutil.rmtree(target / "cardline", ignore_errors=True)
    generate(target)
    if keep is not None:
        (target / "__init__.py").write_text(keep)
    print(f"generated into {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
