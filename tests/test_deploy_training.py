"""The multi-process training configs in deploy/training/ are what accelerate, the HF Trainer and DeepSpeed accept.

No GPU here, so nothing below trains with FSDP or DeepSpeed (tests/test_distributed.py trains with DDP on the CPU).
What is checked: accelerate's own config loader parses every YAML (unknown top-level keys are errors there), every
nested fsdp_config / deepspeed_config key is an `accelerate launch` option (the launcher copies unknown ones silently),
the launcher turns each config into its environment, accelerate's FSDP and DeepSpeed plugins accept that environment,
and the HF Trainer's DeepSpeed integration fills every "auto" of the JSON configs from our TrainingArguments with no
mismatch. Where the `deepspeed` package is importable (not a project dependency) DeepSpeed's own config class
validates the filled JSON too; this was run with deepspeed 0.19.8 installed in a throwaway folder.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from conftest import BASE_MODEL, ROOT

FOLDER = ROOT / "deploy" / "training"
KIND = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed-zero2.yaml": "DEEPSPEED",
        "deepspeed-zero3.yaml": "DEEPSPEED", "multinode.yaml": "MULTI_GPU"}
ZERO = {"deepspeed-zero2.yaml": 2, "deepspeed-zero3.yaml": 3}
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def launch(path: Path, *options: str):
    """What `accelerate launch --config_file PATH OPTIONS -m llmstack train` prepares: its parsed arguments and the
    environment it gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), *options, "-m", "llmstack", "train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before calling the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_the_folder_holds_the_documented_configs():
    assert {p.name for p in FOLDER.glob("*.yaml")} == set(KIND)
    assert {p.name for p in FOLDER.glob("*.json")} == {"zero2.json", "zero3.json"}
    readme = (FOLDER / "README.md").read_text()
    for name in [*KIND, "zero2.json", "zero3.json"]:
        assert name in readme, f"deploy/training/README.md does not mention {name}"


@pytest.mark.parametrize("name", sorted(KIND))
def test_accelerate_loads_the_config(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = ClusterConfig.from_yaml_file(FOLDER / name)  # raises on unknown top-level keys
    assert type(load_config_from_file(str(FOLDER / name))) is ClusterConfig
    assert cfg.distributed_type.value == KIND[name]
    assert cfg.num_processes >= 2 and cfg.num_processes % cfg.num_machines == 0
    assert 0 <= cfg.machine_rank < cfg.num_machines
    options = {a.dest for a in launch_command_parser()._actions}
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in cfg.fsdp_config] + list(cfg.deepspeed_config)
    assert not [k for k in nested if k not in options], "keys accelerate launch does not know (it ignores them)"
    assert bool(cfg.fsdp_config) == (name == "fsdp.yaml") and bool(cfg.deepspeed_config) == (name in ZERO)


@pytest.mark.parametrize("name", sorted(KIND))
def test_accelerate_launch_prepares_the_processes(name):
    raw = yaml.safe_load((FOLDER / name).read_text())
    args, env = launch(FOLDER / name)
    assert args.num_processes == raw["num_processes"] and args.num_machines == raw["num_machines"]
    if name in ZERO:
        ds_file = ROOT / raw["deepspeed_config"]["deepspeed_config_file"]  # relative to the repo root
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and ds_file.is_file()
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == raw["deepspeed_config"]["deepspeed_config_file"]
        assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == ZERO[name]
        assert "mixed_precision" not in raw, "accelerate refuses mixed_precision next to a deepspeed_config_file"
    else:
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert int(args.nproc_per_node) == raw["num_processes"] // raw["num_machines"]
    if name == "multinode.yaml":
        assert args.num_machines == 2 and args.main_process_ip and args.main_process_port
        assert launch(FOLDER / name, "--machine_rank", "1")[0].machine_rank == 1  # the other machine's command


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_fsdp_plugin_accepts_the_config(monkeypatch):
    import accelerate.utils.dataclasses as acc_dc
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    _, env = launch(FOLDER / "fsdp.yaml")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # fsdp_sync_module_states asks for the current GPU; there is none here
    monkeypatch.setattr(acc_dc, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.use_orig_params and plugin.sync_module_states and not plugin.cpu_ram_efficient_loading
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    plugin.set_auto_wrap_policy(tiny_llama())  # raises if the model has no such layer class
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16


def test_the_base_model_is_a_llama():
    """fsdp.yaml wraps LlamaDecoderLayer: the class of SmolLM2's decoder layers."""
    if not (BASE_MODEL / "config.json").is_file():
        pytest.skip("the base model is not provisioned")
    assert json.loads((BASE_MODEL / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("name", sorted(ZERO))
def test_deepspeed_plugin_accepts_the_config(name, monkeypatch, tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    _, env = launch(FOLDER / name, "--mixed_precision", "bf16")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == ZERO[name]
    assert plugin.deepspeed_config["bf16"]["enabled"] == "auto"  # left to the Trainer
    # the reason the YAML has no mixed_precision: accelerate refuses it next to a deepspeed_config_file
    bad = yaml.safe_load((FOLDER / name).read_text()) | {"mixed_precision": "bf16"}
    bad["deepspeed_config"]["deepspeed_config_file"] = str(FOLDER / f"zero{ZERO[name]}.json")
    (tmp_path / name).write_text(yaml.safe_dump(bad))
    _, env = launch(tmp_path / name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="will be ignored"):
        DeepSpeedPlugin()


def _hf_trainer_ds_config(config: dict):
    """transformers' HfTrainerDeepSpeedConfig: the Trainer's filling of "auto" values. Without deepspeed installed
    transformers defines it on a dummy base, so its methods are put on accelerate's HfDeepSpeedConfig (the base it
    has when deepspeed is there); the filling code is the same."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    if HAVE_DEEPSPEED:
        return HfTrainerDeepSpeedConfig(config)
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    methods = {k: v for k, v in vars(HfTrainerDeepSpeedConfig).items() if not k.startswith("__")}
    obj = type("HfTrainerDeepSpeedConfig", (HfDeepSpeedConfig,), methods)(config)
    obj._dtype, obj.mismatches = None, []
    return obj


def _autos(node, path=""):
    if isinstance(node, dict):
        return [a for k, v in node.items() for a in _autos(v, f"{path}.{k}".lstrip("."))]
    return [path] if node == "auto" else []


def _filled(zero: int, tmp_path, monkeypatch) -> tuple[dict, object]:
    """zero<N>.json as the Trainer completes it for a training config (batch 4, grad_accum 2, clipping 0.5, bf16)."""
    from transformers import LlamaConfig

    from training.config import TrainConfig
    from training.sft import trainer as sft_trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # _training_args sets it; restored afterwards
    cfg = TrainConfig.model_validate({"train": {"batch_size": 4, "grad_accum": 2, "max_grad_norm": 0.5,
                                                "mixed_precision": "bf16"}})
    args = sft_trainer._training_args(cfg, tmp_path, 64)
    ds = _hf_trainer_ds_config(json.loads((FOLDER / f"zero{zero}.json").read_text()))
    ds.trainer_config_process(args)

    class Model:  # what trainer_config_finalize reads: the hidden size (SmolLM2's)
        config = LlamaConfig(hidden_size=576)

    ds.trainer_config_finalize(args, Model(), num_training_steps=100)  # raises on any mismatch
    return ds.config, args


@pytest.mark.parametrize("zero", [2, 3])
def test_the_trainer_fills_every_auto_value(zero, tmp_path, monkeypatch):
    raw = json.loads((FOLDER / f"zero{zero}.json").read_text())
    assert _autos(raw), "the configs leave batch sizes, clipping and precision to the Trainer"
    assert "optimizer" not in raw and "scheduler" not in raw, "train.optimizer / train.scheduler stay in charge"
    filled, args = _filled(zero, tmp_path, monkeypatch)
    assert not _autos(filled)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 4 * 2 * args.world_size and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["stage"] == zero
    if zero == 3:  # the final merged save gathers the full weights through this
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_accepts_the_filled_config(zero, tmp_path, monkeypatch):
    """DeepSpeed's own config classes (pydantic, unknown keys refused) on the filled JSON."""
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (not a project dependency)")
    from deepspeed.runtime.config import DeepSpeedConfig

    filled, _ = _filled(zero, tmp_path, monkeypatch)
    checked = DeepSpeedConfig(filled)
    assert checked.zero_optimization_stage == zero and checked.train_batch_size == 8
    assert checked.gradient_clipping == 0.5
