"""A guarded folder's edit as a PEFT LoRA adapter: exact, not an approximation.

A rank-m fold W' = W + (beta V^T)(V W) is a LoRA update with ``lora_B = beta V^T`` (d_out x m)
and ``lora_A = V W`` (m x d_in), ``r = lora_alpha = m`` (scaling 1); a learned low-rank edit is
its own factors. Kinds whose change is not a LoRA (bias shifts, dense deltas, fused experts)
are refused with the reason (``EditKind.lora_factors``).

Module names are those of the model as transformers 5 loads it (``model.language_model.
layers.N...``); a transformers 4.x model names the same modules ``language_model.model.
layers.N...`` (README, "The edit as a PEFT adapter").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import open_checkpoint
from .errors import InputError, PlanError
from .writes import atomic_output_dir, output_lock

CONFIG, WEIGHTS, CARD = "adapter_config.json", "adapter_model.safetensors", "README.md"


def write_adapter(guarded: Path, source: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the edit of the vlmguard-edit output ``guarded`` (converted from the local folder
    ``source``) as a PEFT adapter in ``out``; returns its adapter_config."""
    from .record import load_record
    from .verify import recorded_edit

    record = load_record(Path(guarded))
    checkpoint = open_checkpoint(Path(source))
    plan, params = recorded_edit(guarded, record, checkpoint)
    factors = plan.kind.lora_factors(checkpoint, plan, params)
    names = _memory_names(checkpoint, list(factors))
    factors = {names[k]: v for k, v in factors.items()}  # keyed as the loaded model names them
    config = _config(record, factors)
    with output_lock(Path(out), "adapter"):
        _check_free(Path(out), overwrite)
        with atomic_output_dir(Path(out)) as tmp:
            _save(tmp, factors, config, record)
    return config


def _check_free(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    if not (out / CONFIG).is_file() or out.is_symlink():
        raise InputError(f"{out} is not an adapter folder (no {CONFIG}); refusing to replace it")


def _memory_names(checkpoint, modules: list[str]) -> dict[str, str]:
    """Each checkpoint module's name in the model transformers builds (on the meta device:
    no weights are read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .learned import memory_names

    config = AutoConfig.from_pretrained(checkpoint.path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    present = {name for name, _ in model.named_modules()}
    found = {}
    for module in modules:
        match = next((n for n in memory_names(module) if n in present), None)
        if match is None:
            raise PlanError(f"{module}: no module of that name in the model transformers builds")
        found[module] = match
    return found


def _config(record: dict[str, Any], factors: dict[str, Any]) -> dict[str, Any]:
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise PlanError(f"the edit's factors have ranks {sorted(ranks)}; one rank expected")
    rank = ranks.pop()
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": record["source"].get("hub_id") or record["source"]["id"],
        "revision": record["source"].get("revision"),
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: the adapter is the fold
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(factors),
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


def _save(folder: Path, factors: dict[str, Any], config: dict[str, Any], record: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, (a, b) in sorted(factors.items()):
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    (folder / CARD).write_text(_card(record, config), "utf-8")


def _card(record: dict[str, Any], config: dict[str, Any]) -> str:
    base = config["base_model_name_or_path"]
    hub = record["source"].get("hub_id")
    return f"""---
{f"base_model: {hub}" if hub else "# no base_model: the source was a local folder"}
library_name: peft
tags: [vlmguard-edit, vlm-guard, safety, lora]
---
# vlmguard-edit adapter for {base}

The VLM-Guard edit of vlmguard-edit as an exact LoRA adapter (rank {config["r"]},
lora_alpha {config["lora_alpha"]}: the adapter at scale 1 is the folded edit,
`{record["map"]}`). Loading it on the base model gives the guarded checkpoint's outputs;
`merge_and_unload()` gives its weights. Scaling the adapter by s scales the edit's
strength by s.

Made by: `{record["command"]}`, then `vlmguard-edit adapter`.
"""


def adapter_scale(model: Any, scale: float) -> None:
    """Set every LoRA layer of a PEFT model to ``scale`` times its configured scaling."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)
