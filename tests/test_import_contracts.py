"""The import layers of pyproject.toml's [tool.importlinter] contract (import-linter, run here so `make test` runs
it): CLI > deploy > stages (training | compression | serving, independent) > evaluation | monitoring > shared
libraries (chatdata | modeling | runtimes | tracking) > the spine. A new import up or across the layers fails with the module
and line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LINT = Path(os.path.dirname(sys.executable)) / "lint-imports"
PACKAGES = ["core", "llmstack", "deploy", "chatdata", "modeling", "evaluation", "monitoring", "runtimes", "tracking",
            "training", "compression", "serving"]
LAYERS = "import layers: CLI > deploy > stages > evaluation, monitoring > shared > core"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd), COLUMNS="200")  # no wrapped contract names in the output
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_contract_is_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("module, leak, broken", [
    ("serving/api.py", "from training import config as _stage_leak  # noqa", "serving.api -> training.config"),
    ("evaluation/quality.py", "from compression import config as _stage_leak  # noqa",
     "evaluation.quality -> compression.config"),
    ("core/log.py", "from monitoring import drift as _stage_leak  # noqa", "core.log -> monitoring.drift"),
], ids=["stage-to-stage", "shared-to-stage", "spine-to-shared"])
def test_a_new_import_across_the_layers_fails_naming_the_line(tmp_path, module, leak, broken):
    """The same contract over a copy of the code with one import that breaks the layers: broken, with file and line."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    lines = path.read_text().splitlines()
    lines.insert(next(i for i, ln in enumerate(lines) if ln.startswith(("import ", "from ")) and "__future__" not in ln),
                 leak)
    path.write_text("\n".join(lines) + "\n")
    line = lines.index(leak) + 1
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert f"{LAYERS} BROKEN" in res.stdout, res.stdout[-2000:]
    assert f"{broken} (l.{line})" in res.stdout, res.stdout[-2000:]


def test_the_readme_layout_matches_the_tree():
    """Every folder the README's layout names exists, and every package of the distribution is named there."""
    import re
    import tomllib

    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Docs")]
    named = set(re.findall(r"^([a-z_.][\w.-]*)/\s", layout, flags=re.M))
    missing = sorted(n for n in named if not (ROOT / n).is_dir() and n not in ("models", "artifacts"))
    assert not missing, f"the README layout names folders that do not exist: {missing}"
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    assert packages <= named, f"packages missing from the README layout: {sorted(packages - named)}"
    assert len(readme.splitlines()) <= 250
