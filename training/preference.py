"""The preference-tuning recipe (DPO, ORPO, KTO), top to bottom: load config -> read and validate preference rows ->
load the model (a base model or a training artifact's merged SFT model) -> evaluate before -> TRL trainer -> evaluate
after -> save adapter + merged model -> manifest (same layout as SFT, so compress and serve take it unchanged).

Rows (read and validated by training/preference_data.py): {prompt | messages | instruction (+ input), chosen,
rejected} for every recipe; kto also takes unpaired rows {prompt ..., completion, label: bool} (pairs become one
desirable and one undesirable row). With LoRA (and the other
mergeable peft methods) the reference model is the same model with its adapter disabled; with full / freeze it is a
second copy (or, with preference.precompute_ref, log-probabilities computed once before training).

What is measured on the held-out pairs (before and after, see `pair_metrics` and `answer_metrics`):
- preference accuracy: share of pairs where the model gives the chosen answer a higher log-probability (summed over
  its tokens) than the rejected one, and the mean log-probability margin;
- after training, the implicit reward margin beta * ((logp - logp_ref)(chosen) - (logp - logp_ref)(rejected)) and its
  accuracy (share > 0), the reference being the model before training;
- rejected-like rate: share of greedy answers to the held-out prompts that look like a rejected answer: not a bare
  JSON object (invalid JSON, or prose around it), a scored field missing, or a scored field's value wrong.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from llmstack import artifacts
from llmstack.config import config_hash, dump_yaml
from llmstack.errors import ConfigError
from llmstack.log import log

from . import data as data_mod
from . import evaluate as ev
from . import methods, outputs, report, sft
from .collate import decoder_and_head
from .config import TrainConfig, warn_poor_settings
from .model import load_model, load_tokenizer, resolve
from .preference_data import PrefRow, prepare, trl_rows

RECIPES = ("dpo", "orpo", "kto")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
REJECTED_KINDS = ("invalid_json", "extra_text", "missing_field", "wrong_value")
FORMAT_KINDS = REJECTED_KINDS[:3]  # the answer is not a bare JSON object with every scored field: a format error


# ---------------------------------------------------------------- metrics
@torch.no_grad()
def sequence_logps(model, pad_id: int, rows: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each (prompt_ids, answer_ids) answer given its prompt."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)
        for j, (p, a) in enumerate(chunk):
            ids[j, :len(p) + len(a)] = torch.tensor(p + a)
            mask[j, :len(p) + len(a)] = 1
            target[j, len(p):len(p) + len(a)] = True
        # the LM head only where the next token is an answer token (the full vocabulary for every position of a
        # batch would be most of the work and memory)
        decoder, head = decoder_and_head(model)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        keep = target[:, 1:]
        logp = torch.log_softmax(head(hidden[keep]).float(), -1).gather(-1, ids[:, 1:][keep][:, None])[:, 0]
        row = torch.arange(len(chunk))[:, None].expand_as(keep)[keep]
        out += torch.zeros(len(chunk)).index_add_(0, row, logp).tolist()
    return out


def pair_metrics(chosen: list[float], rejected: list[float], ref: dict | None = None, beta: float = 0.1) -> dict:
    """Preference accuracy and log-probability margin; with `ref` (the same metrics' logps before training), the
    implicit reward margin and accuracy as DPO defines them."""
    n = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected)]
    out = {"pairs": n, "pref_accuracy": round(sum(m > 0 for m in margins) / max(n, 1), 4),
           "logp_margin": round(sum(margins) / max(n, 1), 4),
           "logp_chosen": round(sum(chosen) / max(n, 1), 4)}
    if ref is not None:
        rewards = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in
                   zip(chosen, rejected, ref["chosen_logps"], ref["rejected_logps"])]
        out["reward_margin"] = round(sum(rewards) / max(n, 1), 4)
        out["reward_accuracy"] = round(sum(x > 0 for x in rewards) / max(n, 1), 4)
    return out


def rejected_kind(prediction: str, reference: str, fields: list[str]) -> str | None:
    """Why a greedy answer looks like a rejected one (None: it matches the chosen answer on every scored field):
    invalid_json (no JSON object in it), extra_text (a JSON object with prose around it), missing_field (a scored
    field absent), wrong_value (a scored field's value differs from the reference)."""
    text = prediction.strip()
    obj = ev.parse_json(text)
    if obj is None:
        return "invalid_json"
    try:
        bare = isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, ValueError):
        bare = False
    if not bare:
        return "extra_text"
    ref = ev.parse_json(reference) or {}
    fields = fields or sorted(ref)
    if any(f not in obj for f in fields):
        return "missing_field"
    if any(ev._norm_value(obj.get(f)) != ev._norm_value(ref.get(f)) for f in fields):
        return "wrong_value"
    return None


def answer_metrics(predictions: list[str], references: list[str], fields: list[str]) -> dict:
    kinds = [rejected_kind(p, r, fields) for p, r in zip(predictions, references)]
    n = max(len(kinds), 1)
    return {"rejected_like": round(sum(k is not None for k in kinds) / n, 4),
            "rejected_like_kinds": {k: round(kinds.count(k) / n, 4) for k in REJECTED_KINDS},
            "format_errors": round(sum(k in FORMAT_KINDS for k in kinds) / n, 4)}


def evaluate(model, tokenizer, rows: list[PrefRow], cfg: TrainConfig, *, ref: dict | None = None,
             label: str = "", generate: bool = True) -> tuple[dict, list[dict], dict]:
    """Pair metrics (log-probabilities) and, with preference.generate, the rejected-like rate of greedy answers on
    the first eval.max_samples held-out rows. Returns (metrics, predictions, logps for the reference)."""
    rows = rows[:cfg.eval.max_samples] if cfg.eval.max_samples else rows
    pairs = [r for r in rows if r.paired]
    pad = tokenizer.pad_token_id
    bs = cfg.eval.batch_size
    logps = {"chosen_logps": sequence_logps(model, pad, [(r.prompt_ids, r.chosen_ids) for r in pairs], bs),
             "rejected_logps": sequence_logps(model, pad, [(r.prompt_ids, r.rejected_ids) for r in pairs], bs)}
    metrics = pair_metrics(logps["chosen_logps"], logps["rejected_logps"], ref, cfg.preference.beta) if pairs else {}
    predictions: list[dict] = []
    if cfg.preference.generate and generate:
        held = [r for r in rows if r.paired or r.label]
        refs = [r.answer() for r in held]
        stats: list[dict] = []
        preds = ev.generate(model, tokenizer, [r.prompt for r in held], cfg.eval.max_new_tokens, bs,
                            desc=f"eval {label}".strip(), stats=stats)
        metrics["n"] = len(held)
        if cfg.eval.json_fields:
            metrics.update(ev.json_metrics(preds, refs, cfg.eval.json_fields))
        metrics.update(answer_metrics(preds, refs, cfg.eval.json_fields))
        predictions = [{"source": r.source, "reference": a, "prediction": p,
                        "rejected_like": rejected_kind(p, a, cfg.eval.json_fields)} | st
                       for r, a, p, st in zip(held, refs, preds, stats)]
    return metrics, predictions, logps


def paired_change(before_preds: list[dict], after_preds: list[dict]) -> dict:
    """Per held-out prompt (the same prompts before and after): answers that went from rejected-like to right
    (fixed) and from right to rejected-like (broken), and the exact two-sided sign test p-value of that split: how
    often a split at least this uneven comes from training that changed nothing on average. On 100 prompts a drop
    of a few points is often p > 0.05. The same for format errors alone (format_*: a format error before and none
    after, whatever the labels), which separates learning the answer's shape from learning its labels."""
    from math import comb

    def split(bad) -> tuple[int, int, float]:
        fixed = sum(bad(b) and not bad(a) for b, a in zip(before_preds, after_preds))
        broken = sum(not bad(b) and bad(a) for b, a in zip(before_preds, after_preds))
        n, k = fixed + broken, min(fixed, broken)
        p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
        return fixed, broken, round(p, 4)

    return dict(zip(("answers_fixed", "answers_broken", "sign_test_p"),
                    split(lambda r: r["rejected_like"] is not None))) | \
        dict(zip(("format_fixed", "format_broken", "format_sign_test_p"),
                 split(lambda r: r["rejected_like"] in FORMAT_KINDS)))


def table(before: dict | None, after: dict | None) -> str:
    """The before/after table: the preference metrics, then the task metrics (evaluate.table)."""
    keys = [("rejected_like", "rejected-like answers (lower is better)"),
            *[(f"kind:{k}", f"  of which {k}") for k in REJECTED_KINDS],
            ("format_errors", "format errors (invalid_json, extra_text, missing_field)"),
            ("pref_accuracy", "preference accuracy (logp chosen > rejected)"),
            ("logp_margin", "mean logp margin (chosen - rejected)"),
            ("reward_accuracy", "implicit reward accuracy"), ("reward_margin", "implicit reward margin"),
            ("answers_fixed", "answers fixed (rejected-like before, right after)"),
            ("answers_broken", "answers broken (right before, rejected-like after)"),
            ("sign_test_p", "sign test p-value (fixed vs broken)"),
            ("format_fixed", "format errors fixed (whatever the labels)"),
            ("format_broken", "format errors introduced"),
            ("format_sign_test_p", "sign test p-value (format fixed vs introduced)")]

    def get(m, k):
        if m is None:
            return None
        return m.get("rejected_like_kinds", {}).get(k[5:]) if k.startswith("kind:") else m.get(k)

    fmt = lambda v: "-" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"  # noqa: E731
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for k, name in keys:
        b, a = get(before, k), get(after, k)
        if b is None and a is None:
            continue
        change = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        lines.append(f"| {name} | {fmt(b)} | {fmt(a)} | {change} |")
    if before is None:  # after only: one value column
        lines = ["| metric | value |", "|---|---|"] + ["| " + ln.split(" | ")[0][2:] + " | " + ln.split(" | ")[2] + " |"
                                                     for ln in lines[2:]]
    return "\n".join(lines + ev.table(before, after).splitlines()[2:])


# ---------------------------------------------------------------- model and trainer
def resolve_model(cfg: TrainConfig) -> tuple[str, dict | None]:
    """The model folder to tune and its parent artifact: a training artifact folder (or its merged/ folder, or a
    `latest` pointer) gives its merged model and becomes the manifest's parent."""
    given = Path(cfg.model.name_or_path)
    folder = None
    if (given / artifacts.MANIFEST).is_file() and (given / "merged" / "config.json").is_file():
        folder, model_dir = given.resolve(), given.resolve() / "merged"
    elif given.name == "merged" and (given.parent / artifacts.MANIFEST).is_file():
        folder, model_dir = given.parent.resolve(), given.resolve()
    if folder is None:
        return resolve(cfg.model.name_or_path, cfg.model.models_dir), None
    m = artifacts.read_manifest(folder)
    parent = {"stage": m.get("stage"), "run_id": m.get("run_id"), "path": str(folder),
              "recipe": m.get("config", {}).get("recipe", "sft"), "fingerprint": m.get("fingerprint")}
    return str(model_dir), parent


def _trl_args(cfg: TrainConfig, work: Path, total: int):
    """The TRL config for the recipe, from our train / preference sections."""
    t, p, recipe = cfg.train, cfg.preference, cfg.recipe
    sched_kwargs = {"min_lr_rate": t.min_lr_ratio} if t.scheduler == "cosine_with_min_lr" else {}
    common = dict(
        output_dir=str(work / "checkpoints"), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=cfg.effective_lr(), num_train_epochs=t.epochs, max_steps=t.max_steps,
        warmup_ratio=t.warmup_ratio, lr_scheduler_type=t.scheduler, lr_scheduler_kwargs=sched_kwargs,
        weight_decay=t.weight_decay, optim=sft.OPTIMIZERS[t.optimizer], max_grad_norm=t.max_grad_norm or 1e9,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, seed=t.seed, data_seed=t.seed, use_cpu=not torch.cuda.is_available(),
        report_to=[], disable_tqdm=True, bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16",
        gradient_checkpointing=False, dataloader_num_workers=0, eval_strategy="no", max_length=cfg.data.max_seq_len,
        beta=p.beta)
    if recipe == "dpo":
        from trl import DPOConfig
        losses = {"loss_type": [p.loss_type or "sigmoid", "sft"], "loss_weights": [1.0, p.sft_weight]} \
            if p.sft_weight else {"loss_type": [p.loss_type or "sigmoid"]}
        return DPOConfig(**common, **losses, precompute_ref_log_probs=p.precompute_ref)
    if recipe == "kto":
        from trl import KTOConfig
        return KTOConfig(**common, loss_type=p.loss_type or "kto", desirable_weight=p.desirable_weight,
                         undesirable_weight=p.undesirable_weight, precompute_ref_log_probs=p.precompute_ref)
    from trl.experimental.orpo import ORPOConfig
    return ORPOConfig(**common)


def _check(cfg: TrainConfig) -> None:
    p, recipe = cfg.preference, cfg.recipe
    if recipe not in RECIPES:
        raise ConfigError(f"training/preference.py runs {', '.join(RECIPES)}, not {recipe}", field="recipe")
    allowed = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES, "orpo": ()}[recipe]
    if p.loss_type is not None and p.loss_type not in allowed:
        raise ConfigError(f"{recipe} has no loss_type {p.loss_type!r}" + (f"; use one of {', '.join(allowed)}"
                          if allowed else " setting (leave it null)"), field="preference.loss_type")
    if p.sft_weight and recipe != "dpo":
        raise ConfigError(f"preference.sft_weight adds TRL's sft loss to dpo; {recipe} does not take it"
                          + (" (orpo has its own NLL term)" if recipe == "orpo" else ""), field="preference.sft_weight")
    if not methods.mergeable(cfg.method.name) or cfg.method.name == "adalora":
        raise ConfigError(f"preference tuning supports full, freeze, lora, dora and ia3, not {cfg.method.name}",
                          field="method.name")


def build_trainer(cfg: TrainConfig, model, tokenizer, prepared, work: Path, total: int, base_path: str):
    """The TRL trainer for the recipe. Peft methods: the adapter config goes to TRL, which wraps the model and uses
    it with the adapter disabled as the reference (no second copy). full / freeze: the method is applied here and a
    second copy of the starting model is the reference (dpo / kto; orpo needs none)."""
    from datasets import Dataset

    args = _trl_args(cfg, work, total)
    train = Dataset.from_list(trl_rows(prepared.train, cfg.recipe))
    val = Dataset.from_list(trl_rows(prepared.validation, cfg.recipe)) if prepared.validation else None
    kwargs = dict(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    peft_method = cfg.method.name not in ("full", "freeze")
    if peft_method:
        kwargs["peft_config"] = methods.peft_config(cfg.method, total, model)
    else:
        kwargs["model"] = methods.apply(model, cfg.method, total)
    if cfg.recipe == "dpo":
        from trl import DPOTrainer as cls
    elif cfg.recipe == "kto":
        from trl import KTOTrainer as cls
    else:
        from trl.experimental.orpo import ORPOTrainer as cls
    if cfg.recipe != "orpo" and not peft_method and not cfg.preference.precompute_ref:
        kwargs["ref_model"] = load_model(base_path, cfg.model.dtype, cfg.model.attn_implementation,
                                         cfg.model.trust_remote_code).eval()
    trainer = cls(**kwargs)
    from transformers import PrinterCallback
    trainer.remove_callback(PrinterCallback)
    return trainer


class _Progress:
    """A TrainerCallback (built lazily: transformers loads inside run) with a tqdm bar and the step time."""

    @staticmethod
    def make():
        from tqdm import tqdm
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
            def __init__(self):
                self.bar, self.step_time, self._t, self.last = None, 0.0, None, {}

            def on_train_begin(self, args, state, control, **kw):
                self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.step_time += time.perf_counter() - self._t
                self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.last = logs
                    post = {"loss": f"{logs['loss']:.4f}"}
                    for k in ("rewards/accuracies", "rewards/margins"):
                        if k in logs:
                            post[k.split("/")[1][:6]] = f"{logs[k]:.3f}"
                    self.bar.set_postfix(post, refresh=False)

            def on_train_end(self, args, state, control, **kw):
                if self.bar is not None:
                    self.bar.close()

        return Progress()


# ---------------------------------------------------------------- the recipe
def run(cfg: TrainConfig, *, force: bool = False) -> Path:
    """Preference-tune and write the artifact; return its folder."""
    _check(cfg)
    root = Path(cfg.output.dir)
    artifacts.clean_stale(root)
    warn_poor_settings(cfg)
    torch.set_num_threads(cfg.train.threads or max(1, os.cpu_count() or 1))
    torch.manual_seed(cfg.train.seed)
    phase = artifacts.Phases()
    t_start, timings, started_at = phase.start, phase.timings, artifacts.now()

    # ---- data
    base_path, parent = resolve_model(cfg)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    prepared = prepare(cfg, tokenizer)
    fingerprint = outputs.fingerprint(cfg, prepared, base_path)
    if not force and (built := artifacts.find_built(root, fingerprint)):
        log.info(f"already built: {built} (same config, data and model; pass --force to train again)")
        m = artifacts.read_manifest(built)
        print(table(m["metrics"].get("before"), m["metrics"].get("after")))
        artifacts.set_latest(root, built.name)
        return built
    run_id = cfg.output.run_id or artifacts.new_run_id()
    work = root / ".work" / run_id
    if (root / run_id).exists() or work.exists():
        raise ConfigError(f"run {run_id} already exists", field="output.run_id")
    cfg.output.run_id = run_id
    work.mkdir(parents=True)
    try:
        return _train(cfg, root, work, run_id, base_path, parent, tokenizer, prepared, fingerprint, phase, timings,
                      t_start, started_at)
    finally:
        if not cfg.output.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)


def _train(cfg, root, work, run_id, base_path, parent, tokenizer, prepared, fingerprint, phase, timings, t_start,
           started_at) -> Path:
    phase("data")
    log.info(f"run {run_id} ({cfg.recipe}): {len(prepared.train)} train / {len(prepared.validation)} validation / "
             f"{len(prepared.test)} test rows; {len(prepared.report['drops'])} rows dropped (see data_report.md)")

    # ---- model, evaluation before (its log-probabilities are the reference for the reward margin)
    model = load_model(base_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    before, before_preds, ref_logps = evaluate(model, tokenizer, prepared.test, cfg, label="before",
                                               generate=cfg.eval.before)
    if not cfg.eval.before:
        before, before_preds = None, []
    phase("load_and_eval_before")

    # ---- train
    t = cfg.train
    n_train = len(prepared.train) * (2 if cfg.recipe == "kto" else 1)
    per_epoch = -(-n_train // (t.batch_size * t.grad_accum))
    total = t.max_steps if t.max_steps > 0 else int(per_epoch * t.epochs + 0.999)
    trainer = build_trainer(cfg, model, tokenizer, prepared, work, total, base_path)
    model = trainer.model
    params = methods.count_parameters(model)
    log.info(f"{cfg.recipe} with {cfg.method.name}: {params['trainable']:,} trainable of {params['total']:,} "
             f"parameters, {total} steps, lr {cfg.effective_lr():g}, beta {cfg.preference.beta:g}")
    progress = _Progress.make()
    trainer.add_callback(progress)
    trainer.train()
    phase("train")
    val = trainer.evaluate() if prepared.validation and t.final_validation else {}
    phase("validation")
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "loss" in h), {})
    tokens = sum(len(r.prompt_ids) * 2 + len(r.chosen_ids) + len(r.rejected_ids) for r in prepared.train)
    tokens = int(tokens * trainer.state.global_step * t.batch_size * t.grad_accum / max(n_train, 1))
    train_stats = {
        "recipe": cfg.recipe, "steps": trainer.state.global_step, "tokens": tokens,
        "tokens_per_s": round(tokens / max(progress.step_time, 1e-9), 1), "step_seconds": round(progress.step_time, 1),
        "final_train_loss": last.get("loss"), "final_logs": {k: v for k, v in last.items() if "/" in k},
        "validation_loss": val.get("eval_loss"), "parameters": params, "effective_lr": cfg.effective_lr(),
        "effective_batch": t.batch_size * t.grad_accum, "beta": cfg.preference.beta,
        "loss_type": cfg.preference.loss_type or {"dpo": "sigmoid", "kto": "kto", "orpo": "orpo"}[cfg.recipe],
        "sft_weight": cfg.preference.sft_weight,
        "reference": ("the model with its adapter disabled" if cfg.method.name not in ("full", "freeze") else
                      "none (orpo)" if cfg.recipe == "orpo" else "precomputed log-probabilities"
                      if cfg.preference.precompute_ref else "a frozen copy of the starting model"),
    }
    model = model.to("cpu")

    # ---- evaluation after, merge (the adapter is saved first: merging folds it into the weights)
    method = cfg.method.name
    adapter_dir = work / "adapter" if method not in ("full", "freeze") else None
    if adapter_dir:
        model.save_pretrained(adapter_dir)
    merged = methods.merged(model, method)
    after, after_preds = None, []
    if cfg.eval.after:
        after, after_preds, _ = evaluate(merged, tokenizer, prepared.test, cfg, ref=ref_logps, label="after")
        if before_preds and after_preds:
            after.update(paired_change(before_preds, after_preds))
    train_stats["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    phase("merge_and_eval_after")

    # ---- artifact (same layout and manifest as SFT)
    with artifacts.atomic_dir(root, run_id) as out:
        written = outputs.save_models(out, tokenizer, merged, adapter_dir, method, cfg.output.save_merged)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        artifacts.write_json(out / "data_report.json", prepared.report)
        (out / "data_report.md").write_text(data_mod.report_markdown(prepared.report))
        report.length_histogram({s: [len(r.input_ids) for r in getattr(prepared, s)]
                                 for s in ("train", "validation", "test")}, cfg.data.max_seq_len,
                                out / "token_lengths.png")
        report.loss_curve(history, out / "loss_curve.png")
        for name, preds in (("before", before_preds), ("after", after_preds)):
            if preds:
                (out / f"predictions_{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        table_md = table(before, after)
        manifest = {
            **outputs.manifest_header(cfg, run_id, fingerprint, base_path, parent), "recipe": cfg.recipe,
            "datasets": prepared.report["sources"], "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg, {"output.run_id"}),
            "metrics": {"before": before, "after": after, "validation_loss": val.get("eval_loss"),
                        "definitions": METRIC_DEFINITIONS},
            "metrics_table": table_md, "training": train_stats, "outputs": written, "drift_reference": None,
            "packages": artifacts.package_versions(), "started_at": started_at, "finished_at": artifacts.now(),
            "wall_seconds": round(time.time() - t_start, 1),
        }
        phase("save")
        manifest["timings"] = timings
        outputs.finish_artifact(out, manifest, table_md)
    final = root / run_id
    artifacts.set_latest(root, run_id)
    n = (after or before or {}).get("n") or (after or before or {}).get("pairs", 0)
    print(f"\n{cfg.recipe.upper()} before/after on the held-out preference rows ({n}):\n")
    print(table_md)
    print(f"\nartifact: {final}  (latest: {root / 'latest'})")
    print(phase.summary())
    return final


METRIC_DEFINITIONS = {
    "pref_accuracy": "share of held-out pairs where the model's summed log-probability of the chosen answer is above "
                     "the rejected one's",
    "logp_margin": "mean of logp(chosen) - logp(rejected), summed over answer tokens",
    "reward_margin": "mean implicit reward margin beta * ((logp - logp_before)(chosen) - (logp - logp_before)"
                     "(rejected)), the model before training being the reference",
    "reward_accuracy": "share of held-out pairs with a positive implicit reward margin",
    "answers_fixed": "held-out prompts whose greedy answer was rejected-like before training and right after",
    "answers_broken": "held-out prompts whose greedy answer was right before training and rejected-like after",
    "sign_test_p": "exact two-sided sign test p-value of answers_fixed vs answers_broken (is the change more than "
                   "noise on these prompts?)",
    "format_errors": "share of greedy answers with a format error: invalid_json, extra_text or missing_field "
                     "(rejected_like without wrong_value)",
    "format_fixed": "held-out prompts whose greedy answer had a format error before training and none after",
    "format_broken": "held-out prompts whose greedy answer had no format error before training and one after",
    "format_sign_test_p": "exact two-sided sign test p-value of format_fixed vs format_broken",
    "rejected_like": "share of greedy answers to the held-out prompts that are not a bare JSON object (invalid_json, "
                     "extra_text), miss a scored field (missing_field) or get a scored field wrong (wrong_value)",
}
