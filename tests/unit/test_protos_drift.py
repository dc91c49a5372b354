"""The checked-in generated code is exactly what `make protos` makes from protos/."""
import filecmp
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_protos  # noqa: E402


def _files(base: pathlib.Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_protos(tmp_path):
    gen_protos.generate(tmp_path)
    checked_in = ROOT / "shared" / "proto"
    expected = _files(tmp_path)
    actual = _files(checked_in) - {"__init__.py"}
    assert actual == expected, f"files differ: run `make protos` ({sorted(actual ^ expected)})"
    drifted = [f for f in sorted(expected) if not filecmp.cmp(tmp_path / f, checked_in / f, shallow=False)]
    assert not drifted, f"generated code drifted from protos/: {drifted}; run `make protos`"
