"""transformers backend: the plain reference (any HF causal LM folder, safetensors only, no remote code)."""
from __future__ import annotations

from pathlib import Path

from core.errors import ArtifactError, one_line


class HFBackend:
    name = "transformers"

    def __init__(self, folder: str | Path, threads: int = 0, dtype: str = "float32", adapters: dict | None = None):
        """adapters: {name: PEFT LoRA folder} loaded on top of the model; a batch mixes them row by row (peft's
        mixed-adapter inference), so requests for different adapters still share forward passes."""
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        if not any(Path(folder).glob("*.safetensors")):
            raise ArtifactError(f"no *.safetensors weights in {folder} (only safetensors are loaded)", file=folder)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                              use_safetensors=True, trust_remote_code=False)
        except Exception as exc:
            raise ArtifactError(f"transformers cannot load the model: {one_line(exc)}",
                                file=folder) from None
        self.adapters = dict(adapters or {})
        if self.adapters:
            from peft import PeftModel
            names = list(self.adapters)
            try:
                self.model = PeftModel.from_pretrained(self.model, self.adapters[names[0]], adapter_name=names[0])
                for n in names[1:]:
                    self.model.load_adapter(self.adapters[n], adapter_name=n)
            except Exception as exc:
                raise ArtifactError(f"cannot load LoRA adapter: {one_line(exc)}",
                                    field="adapters") from None
        self.model.eval()
        self.torch = torch

    def forward(self, input_ids, attention_mask, position_ids, past, adapters: list | None = None):
        from transformers import DynamicCache

        torch = self.torch
        cache = DynamicCache()
        if past is not None:
            for i in range(0, len(past), 2):
                cache.update(torch.from_numpy(past[i]), torch.from_numpy(past[i + 1]), i // 2)
        extra = {}
        if self.adapters:
            extra["adapter_names"] = [a or "__base__" for a in (adapters or [None] * input_ids.shape[0])]
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                             position_ids=torch.from_numpy(position_ids), past_key_values=cache, use_cache=True,
                             logits_to_keep=1, **extra)
        arrays = []
        for layer in out.past_key_values.layers:
            arrays += [layer.keys.numpy(), layer.values.numpy()]
        return out.logits[:, -1, :].float().numpy(), arrays
