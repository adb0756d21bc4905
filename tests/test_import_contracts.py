"""The import layers of pyproject.toml's [tool.importlinter] contracts (import-linter, run here so `make test` runs
it): the spine imports no stage, monitoring / runtimes import no stage, the stages never import each other (beyond
the listed debt) nor the CLI. A new import across the layers fails with the module and line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT = Path(os.path.dirname(sys.executable)) / "lint-imports"
PACKAGES = ["llmstack", "training", "compression", "serving", "monitoring", "runtimes"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_contract_is_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 kept, 0 broken" in res.stdout, res.stdout[-2000:]


def test_a_new_import_across_stages_fails_naming_the_line(tmp_path):
    """The same contracts over a copy of the code where serving imports training: broken, with file and line."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    api = tmp_path / "serving" / "api.py"
    lines = api.read_text().splitlines()
    lines.insert(next(i for i, ln in enumerate(lines) if ln.startswith(("import ", "from ")) and "__future__" not in ln),
                 "from training import config as _stage_leak  # noqa")
    api.write_text("\n".join(lines) + "\n")
    line = lines.index("from training import config as _stage_leak  # noqa") + 1
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "the stages never import each other BROKEN" in res.stdout, res.stdout[-2000:]
    assert f"serving.api -> training.config (l.{line})" in res.stdout, res.stdout[-2000:]
