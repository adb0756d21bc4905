"""Knowledge distillation: a (pruned) student learns from the model it was cut from.

Loss per batch, on answer tokens only (the positions whose next token is a reference answer token, as in
`modeling.collate.answer_loss`):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, reference token)

Both models share the tokenizer, so one packed batch (modeling.collate.Collator with the shared prefix) feeds both;
each runs the shared prefix once as a KV cache and its LM head only at answer positions (the 576 x 49152 head is a
fifth of SmolLM2's FLOPs). The teacher runs in eval mode without gradients. What trains is cfg's choice: every student weight, only
the top `train_layers` decoder layers (backpropagation stops below them), or LoRA adapters on those layers
(`lora_rank`, merged into the student afterwards); AdamW, linear warmup over ~5% of the steps, then cosine decay to
0, until `cfg.steps` or `cfg.max_minutes`. alpha 0 is cross-entropy alone, without running the teacher.
"""
from __future__ import annotations

import contextlib
import math
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.errors import CompressError
from core.log import log
from modeling.collate import Collator, decoder_and_head, prefix_cache

WARMUP_RATIO = 0.05
MAX_GRAD_NORM = 1.0


def _vocab(model) -> int:
    _, head = decoder_and_head(model)
    return head.weight.shape[0]


def _check(student, teacher, rows) -> None:
    if student is teacher:
        raise CompressError("the student and the teacher are the same model object: distill a copy")
    if not rows:
        raise CompressError("no training rows to distill on", field="data.train")
    empty = [e.source for e in rows if not any(t != -100 for t in list(e.labels)[1:])]
    if empty:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise CompressError(f"{len(empty)} of {len(rows)} distillation rows have no answer tokens to learn from "
                            f"({', '.join(map(str, empty[:3]))}{more})",
                            hint="rows must be tokenized by chatdata.pipeline.prepare (labels != -100 on the answer)")
    sv, tv = _vocab(student), _vocab(teacher)
    if sv != tv:
        raise CompressError(f"the student's vocabulary ({sv} tokens) differs from the teacher's ({tv}): distillation "
                            "compares their next-token distributions and needs the same tokenizer")


def _order(n: int, seed: int):
    """Row indices forever: a seeded shuffle per epoch."""
    rng = random.Random(seed)
    while True:
        idx = list(range(n))
        rng.shuffle(idx)
        yield from idx


def _answer_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits (float32) at the positions whose next token is an answer token: decoder + LM head on those only."""
    decoder, head = decoder_and_head(model)
    dtype = next(model.parameters()).dtype
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": batch["attention_mask"].to(dtype)}
    if "prefix_ids" in batch:
        kwargs["past_key_values"] = prefix_cache(decoder, batch["prefix_ids"], batch["input_ids"].shape[0])
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    return head(hidden[keep]).float()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce), each a mean over the given answer positions; kl is KL(teacher || student) at temperature T
    (not yet scaled by T^2)."""
    t = temperature
    if teacher_logits is None:
        ce = F.cross_entropy(student_logits, target)
        return ce, torch.zeros((), dtype=ce.dtype), ce
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student_logits, target)
    return alpha * t * t * kl + (1 - alpha) * ce, kl, ce


def _freeze_below_top(model, n: int) -> list:
    """Freeze every weight but the top `n` decoder layers and the final norm (backpropagation then stops below
    them); returns the parameters frozen here, to be unfrozen afterwards."""
    from .prune import decoder_layers

    trainable = {id(p) for layer in list(decoder_layers(model))[-n:] for p in layer.parameters()}
    norm = getattr(getattr(model, "model", None), "norm", None)
    trainable |= {id(p) for p in (norm.parameters() if norm is not None else [])}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _add_lora(model, rank: int, top_layers: int):
    """LoRA adapters (rank r, alpha 2r) on every linear layer of the top `top_layers` decoder layers (0: all), injected
    into `model` in place (LLM-Pruner's recovery); returns the peft wrapper, whose merge_and_unload folds them in."""
    from peft import LoraConfig, get_peft_model

    from .prune import ATTN, MLP, decoder_layers

    n = len(decoder_layers(model))
    layers = list(range(n - top_layers, n)) if top_layers else list(range(n))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(ATTN + MLP),
                        layers_to_transform=layers, layers_pattern="layers", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based): linear warmup, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def _trainable(student, cfg, keep_sparsity: bool):
    """The student in train mode with only what cfg trains requiring gradients (LoRA adapters on the top layers,
    the top cfg.train_layers layers, or every weight). Yields (params, masks): the trainable tensors and, with
    keep_sparsity, the zero pattern of each sparse weight. On exit everything is restored, LoRA merged into the
    student's own Linear weights, and the student is in eval mode."""
    student.train()
    peft_model = _add_lora(student, cfg.lora_rank, cfg.train_layers) if cfg.lora_rank else None
    frozen = _freeze_below_top(student, cfg.train_layers) if cfg.train_layers and not peft_model else []
    try:
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise CompressError("the student has no trainable parameters")
        masks = {}
        if keep_sparsity:
            masks = {p: p.detach() != 0 for p in params if p.dim() == 2 and bool((p == 0).any())}
        yield params, masks
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if peft_model is not None:
            peft_model.merge_and_unload()  # the LoRA layers fold into the student's own Linear weights, in place
        student.eval()


def _step(student, teacher, batch: dict, cfg, opt, sched, params: list, masks: dict) -> dict:
    """One optimizer step on one packed batch; returns the step's losses and token counts."""
    target = batch["labels"][:, 1:]
    keep = target != -100
    t_logits = None
    if cfg.alpha > 0:  # alpha 0: cross-entropy on the reference only, the teacher never runs
        with torch.no_grad():
            t_logits = _answer_logits(teacher, batch, keep)
    s_logits = _answer_logits(student, batch, keep)
    loss, kl, ce = kd_loss(s_logits, t_logits, target[keep], cfg.alpha, cfg.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if masks:
        with torch.no_grad():
            for p, m in masks.items():
                p.mul_(m)
    return {"loss": round(float(loss.detach()), 6), "kl": round(float(kl.detach()), 6),
            "ce": round(float(ce.detach()), 6), "tokens": int(batch["n_tokens"]), "answer_tokens": int(keep.sum())}


def _mean_last(values: list, n: int = 5) -> float:
    return round(sum(values[-n:]) / len(values[-n:]), 6)


def distill(student, teacher, rows, pad_id: int, cfg, max_len: int, *, progress: bool = True,
            keep_sparsity: bool = False) -> dict:
    """Train the student to match the teacher on the answer tokens of `rows` (tokenized chatdata.pipeline.Example rows);
    see the module docstring for the loss. cfg: compression.config.DistillCfg (train_layers / lora_rank choose what
    trains).

    keep_sparsity: re-apply the student's zero pattern after every step (after `sparsify`; otherwise the zeros fill
    in). At least one step runs; the run stops early when cfg.max_minutes have passed. The student is left in eval
    mode. Returns steps done, seconds, whether it stopped early, the losses (first, mean of the last 5, history)."""
    _check(student, teacher, rows)
    feats = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in rows]
    collate = Collator(pad_id, max_len, pack=True, share_prefix=True)
    order = _order(len(feats), cfg.seed)
    teacher.eval()
    warmup = max(1, math.ceil(WARMUP_RATIO * cfg.steps))
    steps: list[dict] = []
    stopped_early = False
    bar = tqdm(total=cfg.steps, desc="distill", unit="step", dynamic_ncols=True, disable=not progress)
    t0 = time.perf_counter()
    with _trainable(student, cfg, keep_sparsity) as (params, masks), bar:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, warmup))
        while len(steps) < cfg.steps:
            batch = collate([feats[next(order)] for _ in range(cfg.batch_size)])
            steps.append(_step(student, teacher, batch, cfg, opt, sched, params, masks))
            bar.update(1)
            bar.set_postfix({"loss": f"{steps[-1]['loss']:.4f}", "kl": f"{steps[-1]['kl']:.4f}"}, refresh=False)
            if len(steps) < cfg.steps and time.perf_counter() - t0 >= cfg.max_minutes * 60:
                stopped_early = True
                break
    seconds = time.perf_counter() - t0
    done = len(steps)
    stop_reason = (f"distill.max_minutes={cfg.max_minutes:g} elapsed after {done} of {cfg.steps} steps"
                   if stopped_early else "all steps done")
    if stopped_early:
        log.info(f"distillation stopped: {stop_reason}")
    history, kls, ces = ([s[k] for s in steps] for k in ("loss", "kl", "ce"))
    tokens = sum(s["tokens"] for s in steps)
    return {"steps": done, "steps_planned": cfg.steps, "seconds": round(seconds, 1), "stopped_early": stopped_early,
            "stop_reason": stop_reason,
            "loss_first": history[0], "loss_last": _mean_last(history),
            "kl_first": kls[0], "kl_last": _mean_last(kls), "ce_first": ces[0], "ce_last": _mean_last(ces),
            "history": history, "history_kl": kls, "history_ce": ces,
            "tokens": tokens, "answer_tokens": sum(s["answer_tokens"] for s in steps),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "warmup_steps": warmup,
            "lr": cfg.lr, "batch_size": cfg.batch_size, "alpha": cfg.alpha, "temperature": cfg.temperature,
            "keep_sparsity": bool(masks)}
