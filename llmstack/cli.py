"""`llmstack` console script. Every subcommand is one module of llmstack/commands/ with `register(sub)` (its parser)
and `run(args)` (what it does); COMMANDS lists them in `--help` order. Heavy imports happen inside `run`, so `--help`
answers instantly. Every StackError becomes a one-line message and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from core.errors import StackError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# llmstack/commands/<name>.py, in the order `llmstack --help` lists them
COMMANDS = ("train", "evaluate", "data", "augment", "compress", "serve", "reload", "retrain", "keys", "bento", "drift",
            "log", "track", "tune", "harness", "report", "fairness", "pairs", "model")


class _IntermixedParser(argparse.ArgumentParser):
    """Subcommand parser whose positionals may come after options (`eval MODEL --config C eval.max_samples=2`).

    argparse refuses parse_intermixed_args on a parser with subcommands, so each subcommand parser intermixes itself;
    parse_known_intermixed_args calls parse_known_args again, which then parses normally. It hides positionals'
    defaults while parsing options (--help included), so positional help must not use %(default)s."""
    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or self._subparsers is not None:  # a command with actions (drift report): plain
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmstack", description="Train -> compress -> serve an LLM. "
                                "Stages talk through artifacts under artifacts/<stage>/.")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)
    for name in COMMANDS:
        importlib.import_module(f"llmstack.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.log import setup
    setup(args.verbose)
    try:
        return args.func(args)
    except StackError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
