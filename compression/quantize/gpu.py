"""GPU quantization for the vLLM / transformers serving path: GPTQ 4-bit (optimum + gptqmodel) and bitsandbytes
int8 / NF4, each written as a HF folder. Without a CUDA GPU (or the backend package) they raise `Unavailable`, which
the compress run records as a skipped variant with its reason."""
from __future__ import annotations

from pathlib import Path

from core.errors import CompressError

from ..config import GPU_QUANT
from ..export import SIDE_FILES, check_model_dir, copy_side_files, one_line


class Unavailable(Exception):
    """A method cannot run on this machine (e.g. no CUDA GPU); `reason` says why, in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _group_size(config: dict) -> int:
    """The largest GPTQ group size (128, 64, 32) dividing every linear layer's input width."""
    widths = [config.get("hidden_size"), config.get("intermediate_size")]
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if heads and head_dim:
        widths.append(heads * head_dim)
    widths = [w for w in widths if w]
    for g in (128, 64, 32):
        if all(w % g == 0 for w in widths):
            return g
    return -1  # one group per output channel


def gpu_quantize(model_dir, out_dir, method: str, calib_texts: list[str] | None = None) -> Path:
    """GPU quantization into a HF folder that vLLM / transformers load: gptq (4-bit, calibrated on calib_texts
    through optimum + gptqmodel), bnb_int8 or bnb_nf4 (bitsandbytes, saved pre-quantized). Raises Unavailable before
    importing anything GPU-only when this machine has no CUDA GPU or the backend package is missing."""
    if method not in GPU_QUANT:
        raise CompressError(f"unknown GPU quantization method '{method}' ({', '.join(GPU_QUANT)})",
                            field="quantize")
    folder, config = check_model_dir(model_dir)
    if method == "gptq" and not [t for t in (calib_texts or []) if t and t.strip()]:
        raise CompressError("gptq needs calibration texts", file=folder)
    import torch

    if not torch.cuda.is_available():
        raise Unavailable(f"{method} needs a CUDA GPU (bitsandbytes/gptq); this machine has none")
    from importlib.util import find_spec

    # transformers imports these itself (GPTQConfig: optimum's GPTQ quantizer on gptqmodel; BitsAndBytesConfig:
    # bitsandbytes); named here, literally, so tests/test_gpu_env.py finds them among this path's imports
    installed = {"optimum": find_spec("optimum"), "gptqmodel": find_spec("gptqmodel"),
                 "bitsandbytes": find_spec("bitsandbytes")}
    missing = [n for n in (("optimum", "gptqmodel") if method == "gptq" else ("bitsandbytes",)) if not installed[n]]
    if missing:
        raise Unavailable(f"{method} needs {' and '.join(missing)}, not installed here (the gpu extra: "
                          "deploy/requirements/train-gpu-extra.txt)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GPTQConfig

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if method == "bnb_int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    elif method == "bnb_nf4":
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        dtype = torch.float16  # the gptq kernels of vLLM and gptqmodel run in float16
        qconfig = GPTQConfig(bits=4, group_size=_group_size(config), sym=True, desc_act=False,
                             dataset=[t for t in calib_texts if t and t.strip()], tokenizer=tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=qconfig, dtype=dtype,
                                                     device_map={"": 0})
        model.save_pretrained(out, safe_serialization=True)
    except Exception as exc:
        raise CompressError(f"{method} quantization failed ({one_line(exc)})", file=folder) from None
    tokenizer.save_pretrained(out)
    # the tokenizer and generation defaults verbatim; config.json stays the quantized one (quantization_config)
    copy_side_files(folder, out, [n for n in SIDE_FILES if n != "config.json"])
    return out
