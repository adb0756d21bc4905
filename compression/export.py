"""ONNX export with KV cache (optimum-onnx), ONNX Runtime loading, and the PyTorch-vs-ONNX parity check.

`export_onnx` writes a folder that `ORTModelForCausalLM.from_pretrained` loads: `model.onnx` (task
text-generation-with-past: input_ids, attention_mask, position_ids and past_key_values.* in, logits and present.* out)
plus config.json, generation_config.json and the tokenizer files copied verbatim from the model folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from core.errors import CompressError, StackError, one_line
from runtimes.onnx import load_ort

TASK = "text-generation-with-past"
ONNX_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data")
# Files an ONNX folder needs besides the graph: the model config, generation defaults and the tokenizer.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "added_tokens.json",
              "tokenizer.model", "vocab.json", "merges.txt")


def check_model_dir(model_dir: str | Path) -> tuple[Path, dict]:
    """A HF causal LM folder with a readable config, weights and a tokenizer; returns (folder, config dict).
    Every problem is a CompressError naming the folder."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CompressError("model folder does not exist", file=folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CompressError("not a Hugging Face model folder: config.json is missing", file=folder)
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"config.json is not valid JSON ({one_line(exc)})", file=folder) from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise CompressError("config.json has no model_type", file=folder)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise CompressError("no weights in the folder (model.safetensors or pytorch_model.bin)", file=folder)
    for w in weights:
        if w.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(w), framework="pt") as f:
                    f.keys()
            except Exception as exc:  # a truncated or garbage file
                raise CompressError(f"{w.name} is not a readable safetensors file ({one_line(exc)})",
                                    file=folder) from None
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CompressError("no tokenizer files (tokenizer.json / tokenizer_config.json)", file=folder)
    return folder, config


def check_exportable(model_type: str, folder: Path) -> None:
    """The architecture must have an ONNX config for text generation with past key values in optimum."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs with the TasksManager)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx",
                                                                library_name="transformers")
    except (KeyError, ValueError):
        raise CompressError(f"architecture '{model_type}' is not supported by the optimum-onnx exporter",
                            file=folder) from None
    if TASK not in tasks:
        raise CompressError(f"architecture '{model_type}' cannot be exported as {TASK} "
                            f"(optimum-onnx supports: {', '.join(sorted(tasks)) or 'nothing'})", file=folder)


def copy_side_files(src: str | Path, dst: str | Path, names=SIDE_FILES) -> None:
    """Copy config / generation config / tokenizer files that exist in src into dst (overwriting)."""
    src, dst = Path(src), Path(dst)
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_onnx(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Export a HF causal LM folder to ONNX (fp32, with KV cache) into out_dir; returns out_dir.

    Writes into out_dir only (the caller makes it atomic). Unsupported architectures and corrupt or incomplete model
    folders raise CompressError naming the folder."""
    folder, config = check_model_dir(model_dir)
    check_exportable(config["model_type"], folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import warnings

    import torch
    from optimum.exporters.onnx import main_export
    try:
        with warnings.catch_warnings():  # the tracer's advice about Python booleans: noise for standard decoders
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            main_export(model_name_or_path=str(folder), output=out, task=TASK, device="cpu", dtype="fp32",
                        do_validation=False, local_files_only=True, library_name="transformers",
                        trust_remote_code=False)
    except StackError:  # ours already names what and where
        raise
    except Exception as exc:
        raise CompressError(f"ONNX export failed ({one_line(exc)})", file=folder) from None
    if not (out / "model.onnx").is_file():
        raise CompressError(f"ONNX export wrote no model.onnx into {out}", file=folder)
    copy_side_files(folder, out)  # verbatim: the exporter re-saves the tokenizer, ours is the reference
    return out


def _chat_ids(tokenizer, prompt) -> "torch.Tensor":  # noqa: F821
    from chatdata.pipeline import render

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = render(tokenizer, messages, generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def check_parity(model_dir: str | Path, onnx_dir: str | Path, prompts: list[str], *, atol: float = 1e-3,
                 new_tokens: int = 16, threads: int = 0) -> dict:
    """PyTorch fp32 vs the ONNX model on chat prompts: the largest absolute logit difference over every prompt
    position, and whether greedy generations of `new_tokens` tokens are identical. Raises CompressError naming the
    prompt when the difference exceeds atol or a greedy output differs."""
    if not prompts:
        raise CompressError("parity check needs at least one prompt", file=onnx_dir)
    import torch

    from modeling.model import load_model, load_tokenizer

    folder, _ = check_model_dir(model_dir)
    tokenizer = load_tokenizer(str(folder))
    ort_model = load_ort(onnx_dir, threads=threads)
    pt_model = load_model(str(folder), dtype="float32").eval()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    worst, identical, problems = 0.0, 0, []
    try:
        for i, prompt in enumerate(prompts):
            ids = _chat_ids(tokenizer, prompt)
            mask = torch.ones_like(ids)
            with torch.no_grad():
                ref = pt_model(input_ids=ids, attention_mask=mask).logits.float()
                got = ort_model(input_ids=ids, attention_mask=mask).logits.float()
                diff = float((ref - got).abs().max())
                a = pt_model.generate(input_ids=ids, attention_mask=mask, **gen)[0, ids.shape[1]:].tolist()
                b = ort_model.generate(input_ids=ids, attention_mask=mask, **gen)[0, ids.shape[1]:].tolist()
            worst = max(worst, diff)
            where = f"prompt {i} ({str(prompt)[:50]!r})"
            if diff > atol:
                problems.append(f"{where}: max |logit diff| {diff:.3g} > atol {atol:g}")
            if a == b:
                identical += 1
            else:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                problems.append(f"{where}: greedy outputs differ from token {k} (PyTorch "
                                f"{tokenizer.decode(a[k:k + 8])!r} vs ONNX {tokenizer.decode(b[k:k + 8])!r}; "
                                f"max |logit diff| {diff:.3g})")
    finally:
        torch.set_num_threads(previous)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); greedy identical on {identical}/{len(prompts)})" \
            if len(problems) > 1 else ""
        raise CompressError(f"ONNX parity failed on {problems[0]}{more}", file=onnx_dir)
    return {"max_abs_logit_diff": worst, "greedy_identical": identical / len(prompts), "atol": atol,
            "prompts": len(prompts), "new_tokens": new_tokens}
