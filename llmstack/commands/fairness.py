"""`llmstack fairness`: counterfactual probes and group metrics for a model folder or training artifact.

Options map one to one onto FairnessCfg (training/config.py), the `fairness:` section of the training config, so the
command and the after-training step run the same check. Light at import: the CLI builds its parser from here.
"""
from __future__ import annotations

import argparse

from core.errors import ConfigError, ManyErrors
from evaluation.fairness.config import FairnessCfg

# option -> FairnessCfg field
OPTIONS = {"--probes": "probes", "--terms": "terms", "--fields": "fields", "--positive": "positive",
           "--group-data": "group_data", "--group-column": "group_column", "--max-flip-rate": "max_flip_rate",
           "--max-parity-diff": "max_parity_difference", "--max-odds-diff": "max_odds_difference",
           "--max-terms": "max_terms_per_group", "--max-probes": "max_probes", "--max-new-tokens": "max_new_tokens",
           "--batch-size": "batch_size", "--examples": "examples"}


def _doc(name: str) -> str:
    f = FairnessCfg.model_fields[name]
    default = f.get_default(call_default_factory=True)
    text = " ".join((f.description or "").split()).replace("%", "%%")
    return f"{text} (default: {default})"


def _positive(values: list[str] | None) -> dict | None:
    if not values:
        return None
    out = {}
    for v in values:
        if "=" not in v or not v.split("=", 1)[1].strip():
            raise ConfigError(f"'{v}' must look like FIELD=LABEL[,LABEL...], e.g. urgency=high,critical",
                              field="--positive")
        f, labels = v.split("=", 1)
        out[f.strip()] = [x.strip() for x in labels.split(",") if x.strip()]
    return out


def config_from_args(args) -> FairnessCfg:
    """FairnessCfg from the options given (others keep their defaults); problems name the option."""
    from core.config import validate

    data = {}
    for opt, name in OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name == "fields":
            value = [x.strip() for x in value.split(",") if x.strip()]
        data[name] = value
    if args.positive:
        data["positive"] = _positive(args.positive)
    try:
        return validate(FairnessCfg, data, overridden=set(data))
    except (ConfigError, ManyErrors) as exc:
        errors = exc.errors if isinstance(exc, ManyErrors) else [exc]
        by_field = {v: k for k, v in OPTIONS.items()}
        for e in errors:
            e.field = by_field.get((e.field or "").split(".")[0], e.field)
            e.file = None
        raise


def run(args) -> int:
    import os

    cfg = config_from_args(args)  # option errors before the heavy imports
    from evaluation.fairness import check as fairness
    fairness.check_inputs(cfg)  # and input errors
    import torch
    torch.set_num_threads(args.threads or os.cpu_count())
    res = fairness.run(args.model, cfg, args.out)
    for attr, m in res["flips"].items():
        print(f"{attr:<12} {m['probes']:>3} probes  flip rate " + "  ".join(
            f"{k} {v:.3f}" for k, v in m["flip_rate"].items()))
    for attr, by in res["group_metrics"]["probes"].items():
        for f, g in by.items():
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{attr:<12} {f}: parity diff {fmt(g['demographic_parity_difference'])}, equal opportunity diff "
                  f"{fmt(g['equal_opportunity_difference'])}, equalized odds diff "
                  f"{fmt(g['equalized_odds_difference'])}")
    print(("FLAGGED: " + "; ".join(res["reasons"])) if res["flagged"] else "not flagged")
    print(f"reports: {res['out']}/fairness.md (.json, .png)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "fairness", help="bias checks: counterfactual probes (flip rates) and group fairness metrics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Swap demographic terms (names, gendered words, nationalities) in probe messages and report how "
        "often the greedy answer changes (flip rate) per attribute and field; demographic parity, equal opportunity "
        "and equalized odds differences per positive-class field (fairlearn). Writes fairness.json, fairness.md "
        "and fairness.png into the training artifact (or --out) and, for a training artifact, a `fairness` entry in "
        "its manifest with flagged: true/false against the thresholds. Exit code 0 either way; read `flagged`.",
        epilog="probe row: {\"id\", \"attribute\": \"gender\", \"instruction\", \"input\": \"Hi, I'm {name}. ...\", "
        "\"reference\": {\"urgency\": \"high\", ...}}\nterms.yaml: attributes: {gender: {groups: {female: {name: "
        "[Emily, Sarah], pronoun: [she]}, male: {...}}}}\nSee docs/fairness.md.")
    p.add_argument("model", help="training artifact (its merged/ model; the manifest gets the entry) or HF model "
                   "folder / built-in name")
    p.add_argument("--out", help="folder for the reports (default: the training artifact itself; for a model folder "
                   "artifacts/fairness/<folder name>)")
    p.add_argument("--probes", help=_doc("probes"))
    p.add_argument("--terms", help=_doc("terms"))
    p.add_argument("--fields", help="comma-separated; " + _doc("fields"))
    p.add_argument("--positive", action="append", metavar="FIELD=LABEL[,LABEL]",
                   help="repeatable; " + _doc("positive"))
    p.add_argument("--group-data", help=_doc("group_data"))
    p.add_argument("--group-column", help=_doc("group_column"))
    p.add_argument("--max-flip-rate", type=float, help=_doc("max_flip_rate"))
    p.add_argument("--max-parity-diff", type=float, dest="max_parity_difference", help=_doc("max_parity_difference"))
    p.add_argument("--max-odds-diff", type=float, dest="max_odds_difference", help=_doc("max_odds_difference"))
    p.add_argument("--max-terms", type=int, dest="max_terms_per_group", help=_doc("max_terms_per_group"))
    p.add_argument("--max-probes", type=int, help=_doc("max_probes"))
    p.add_argument("--max-new-tokens", type=int, help=_doc("max_new_tokens"))
    p.add_argument("--batch-size", type=int, help=_doc("batch_size"))
    p.add_argument("--examples", type=int, help=_doc("examples"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0 = all cores)")
    p.set_defaults(func=run)

