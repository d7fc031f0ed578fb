"""Every benchmark script still imports against the current library (they are not run by the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

# One interpreter for all scripts: imports only (each script runs its work under `__main__`).
_IMPORT_ALL = """
import importlib.util, sys
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("bench_" + path.rsplit("/", 1)[-1][:-3], path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{path} has no main()"
    print("ok", path)
"""


def test_every_bench_script_imports_and_has_main():
    scripts = sorted(str(p) for p in BENCH.glob("*.py"))
    assert len(scripts) >= 5
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *scripts], capture_output=True, text=True,
                          cwd=BENCH.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok ") == len(scripts)
