"""Artifacts: a folder of standard model files plus manifest.json, written atomically, immutable once written.

Layout per stage: `<root>/<run-id>/` (complete artifacts only), `<root>/latest` (a symlink, not a copy),
`<root>/.tmp-<run-id>/` (being written; renamed when complete), `<root>/.work/<run-id>/` (checkpoints for resume).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path

from .errors import ArtifactError

MANIFEST = "manifest.json"
TRAIN_HISTORY = "train_history.json"  # a training artifact's per-step trainer log (loss curve, tracking)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Phases:
    """Wall time per phase of a run: call it with a phase's name when the phase ends; `timings` (seconds, for the
    manifest) and `summary()` (the closing log line)."""

    def __init__(self, log=None):
        self.start = self._last = time.time()
        self.timings: dict[str, float] = {}
        self.log = log

    def __call__(self, name: str) -> None:
        now = time.time()
        self.timings[name] = round(now - self._last, 1)
        self._last = now
        if self.log is not None:
            self.log.debug(f"{name}: {self.timings[name]} s")

    def summary(self) -> str:
        return ("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in self.timings.items())
                + f"; total {time.time() - self.start:.0f} s")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(root: str | Path, run_id: str):
    """Yield a temporary folder; on success rename it to `<root>/<run_id>`, on failure remove it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / run_id
    if final.exists():
        raise ArtifactError("artifact already exists; artifacts are immutable", file=final,
                            hint="choose another output.run_id")
    tmp = root / f".tmp-{run_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)


def set_latest(root: str | Path, run_id: str) -> Path:
    """Point `<root>/latest` at `run_id` atomically (a relative symlink swapped in by rename)."""
    root = Path(root)
    tmp = root / f".latest-{uuid.uuid4().hex[:6]}"
    os.symlink(run_id, tmp)
    os.replace(tmp, root / "latest")
    return root / "latest"


def clean_stale(root: str | Path) -> list[Path]:
    """Remove `.tmp-*` folders left by killed runs (they never look complete: no rename happened)."""
    removed = []
    for p in Path(root).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def read_manifest(path: str | Path) -> dict:
    """Read the manifest of an artifact folder (or a `latest` pointer)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise ArtifactError("not an artifact: manifest.json is missing", file=folder,
                            hint="run the stage that produces it (e.g. `make train`)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"manifest.json is not valid JSON: {exc.msg}", file=file, line=exc.lineno) from None


def parent_folder(manifest: dict, folder: str | Path) -> Path | None:
    """The folder a manifest's `parent` link names. Links are absolute paths from where the run was made; when the
    artifacts were moved or mounted elsewhere (a container's /app/artifacts), the same <stage>/<run_id> is looked
    for under the folders above this one. None when there is no link or nothing is found."""
    parent = manifest.get("parent") or {}
    if not parent.get("path"):
        return None
    path = Path(parent["path"])
    if path.is_dir():
        return path.resolve()
    if parent.get("stage") and parent.get("run_id"):
        for above in list(Path(folder).resolve().parents)[:4]:
            moved = above / parent["stage"] / parent["run_id"]
            if moved.is_dir():
                return moved
    return None


def find_built(root: str | Path, fingerprint: str) -> Path | None:
    """The newest complete artifact under `root` whose manifest has this fingerprint, if any."""
    root = Path(root)
    if not root.is_dir():
        return None
    hits = []
    for d in root.iterdir():
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and (d / MANIFEST).is_file():
            try:
                m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            if m.get("fingerprint") == fingerprint:
                hits.append((m.get("finished_at", ""), d))
    return max(hits)[1] if hits else None


def package_versions(names=("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llmstack")) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def dir_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
