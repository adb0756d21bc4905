"""Concise console logging shared by every stage."""
from __future__ import annotations

import logging
import os
import sys
import warnings

from .errors import StackWarning

_NOISY = ["transformers", "datasets", "peft", "accelerate", "urllib3", "filelock", "fsspec", "matplotlib", "torch"]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning that passes the filters is one `warning: ...` line (verbose runs keep Python's format)."""
    log.warning(f"warning: {message}")


def setup(verbose: bool = False) -> logging.Logger:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if not verbose:
        for name in _NOISY:
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=UserWarning)  # third-party noise
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("default", category=StackWarning)  # ours: shown (takes precedence, added last)
        warnings.showwarning = _show_warning
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # env, not imports: --help stays instant
    return logging.getLogger("llmstack")


log = logging.getLogger("llmstack")
