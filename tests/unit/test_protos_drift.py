"""The checked-in generated code is exactly what `make protos` makes from protos/."""
import filecmp
import pathlib
import subprocess
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


def test_generated_code_imports_only_inside_the_package():
    """No generated module imports a top-level `cardline` (nothing on sys.path to find it)."""
    stray = [str(p.relative_to(ROOT)) for p in (ROOT / "shared" / "proto").rglob("*.py*")
             if p.suffix in (".py", ".pyi") and gen_protos.into_package(p.read_text()) != p.read_text()]
    assert not stray, f"generated code imports top-level cardline: {stray}"
    probe = ("import sys, shared.proto; "
             "sys.exit(any(m == 'cardline' or m.startswith('cardline.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0, "a top-level cardline was imported"
