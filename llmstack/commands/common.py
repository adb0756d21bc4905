"""What the subcommands share: default paths, help texts, the lazy config reference, the drift reference lookup."""
from __future__ import annotations

import argparse
import importlib

from core.errors import StackError

DEFAULT_CONFIG = "configs/train.yaml"
OVERRIDES_HELP = ("section.key=value overrides of the config, e.g. train.lr=1e-4 method.name=dora "
                  "data.max_seq_len=256 (values are parsed as YAML: lists like method.target_modules=[q_proj,v_proj])")


class LazyEpilog(argparse.RawDescriptionHelpFormatter):
    """Render the config reference only when --help is asked for."""

    def add_text(self, text):
        super().add_text(text() if callable(text) else text)


def config_help(module: str, name: str, prefix: str = ""):
    """The epilog of a command with a config: every option of the config model (a section of it: `prefix`, e.g.
    "data.augment."), rendered when --help asks."""
    def render() -> str:
        from core.config import describe
        model = getattr(importlib.import_module(module), name)
        return "config options (YAML sections; override any with section.key=value):\n" + describe(model, prefix)
    return render


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of documents, got {v}")
    return v


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def log_and_reference_args(p: argparse.ArgumentParser) -> None:
    """--log, --model, --reference: the request log and the drift reference it is compared with."""
    p.add_argument("--log", default="artifacts/serve/requests.sqlite",
                   help="request log (SQLite, monitoring.request_log.path; default: %(default)s)")
    p.add_argument("--model", default="artifacts/compress/latest",
                   help="served artifact whose drift reference is used (default: %(default)s)")
    p.add_argument("--reference", help="a drift_reference.json instead of --model's")


def reference(args):
    from monitoring import drift
    if args.reference:
        return drift.Reference.load(args.reference)
    found = drift.find_reference(args.model)
    if found is None:
        raise StackError(f"no drift reference next to {args.model} or its parent artifacts", field="--model",
                         hint="pass --reference path/to/drift_reference.json, or train with drift.enabled")
    return drift.Reference.load(found)
