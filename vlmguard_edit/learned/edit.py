"""A learned edit: its file (``Edit``: deltas or low-rank factors per checkpoint key, with
provenance and the calibration report), its exact fold (W + dW in float32, cast once) and
its runtime reference (a forward hook adding x dW^T + db, or (x A^T) B^T)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import decode_provenance, read_provenance, read_tensor, save_with_provenance
from ..errors import DirectionError, PlanError

KIND = "image-path"  # the kind of an edit file written before kinds were recorded


FACTORS = (".lora_A", ".lora_B")


EDIT_FORMAT = "vlmguard-edit/1"


@dataclass
class Edit:
    """Deltas by checkpoint key (float32), or a low-rank pair ``<key>.lora_A`` / ``.lora_B``
    per key, with provenance and the calibration report."""

    deltas: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = KIND

    def save(self, path: Path) -> None:
        tensors = {key: d.float().contiguous() for key, d in sorted(self.deltas.items())}
        fmt = {"vlmguard.format": EDIT_FORMAT, "vlmguard.kind": self.kind}
        save_with_provenance(path, tensors, fmt, self.meta)

    @classmethod
    def load(cls, path: Path) -> Edit:
        header, metadata = read_provenance(path, "edit file", DirectionError)
        if metadata.get("vlmguard.format") != EDIT_FORMAT:
            raise DirectionError(f"{path} is not a vlmguard-edit learned edit file")
        deltas = {key: read_tensor(Path(path), info) for key, info in header.tensors.items()}
        meta = decode_provenance(metadata, ("vlmguard.format", "vlmguard.kind"))
        return cls(deltas, meta, metadata.get("vlmguard.kind", KIND))

    def delta(self, key: str) -> torch.Tensor:
        """The dense change of one checkpoint tensor (B A for a low-rank pair), float32."""
        if key in self.deltas:
            return self.deltas[key]
        a, b = (self.deltas[key + suffix].float() for suffix in FACTORS)
        return b @ a

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each changed checkpoint tensor."""
        out = {}
        for key, value in self.deltas.items():
            if key.endswith(FACTORS[1]):
                continue  # read with its lora_A
            if key.endswith(FACTORS[0]):
                base = key.removesuffix(FACTORS[0])
                out[base] = (self.deltas[base + FACTORS[1]].shape[0], value.shape[1])
            else:
                out[key] = tuple(value.shape)
        return out


def fold(before: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """before + delta in float32, cast back once; refuses non-finite results."""
    if tuple(delta.shape) != tuple(before.shape):
        raise PlanError(f"edit delta has shape {list(delta.shape)}, tensor {list(before.shape)}")
    out = before.to(torch.float32) + delta.to(torch.float32)
    if not torch.isfinite(out.sum()):
        raise PlanError("edited tensor has non-finite values")
    return out if before.dtype == torch.float32 else out.to(before.dtype)


def find_module(model: torch.nn.Module, names: tuple[str, ...]) -> tuple[str, torch.nn.Linear]:
    """A planned Linear in a loaded model, by any of the names it may have there (and the
    name transformers' own checkpoint renaming gives the first one)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    own = renamed(names[0], model_type) if names and model_type else None
    for name in (*names, *([own] if own else [])):
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(name)
            if isinstance(module, torch.nn.Linear):
                return name, module
    raise PlanError(f"no planned Linear found in the loaded model (tried {', '.join(names)})")


def renamed(module: str, model_type: str) -> str | None:
    """A Hub module name as loaded: transformers' checkpoint conversion mapping of the model
    type (its renaming rules, in order), or None where it has none."""
    import re

    try:
        from transformers.conversion_mapping import (
            WeightRenaming,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4.x loads the Hub's names as they are
        return None
    key = module + ".weight"
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(rule, WeightRenaming):
            for source, target in zip(rule.source_patterns, rule.target_patterns, strict=False):
                key = re.sub(source, target, key)
    return key.removesuffix(".weight") if key != module + ".weight" else None


def memory_names(module: str) -> tuple[str, ...]:
    """The names a checkpoint module may have in the loaded model (transformers 5 nests the
    Hub's ``language_model.model.`` and top-level projectors under ``model.``)."""
    nested = module.replace("language_model.model.", "model.language_model.", 1)
    # Qwen2/2.5-VL's Hub keys name the text layers model.layers.N (legacy layout)
    legacy = module.replace("model.layers.", "model.language_model.layers.", 1)
    return tuple(dict.fromkeys((module, f"model.{module}", nested, legacy)))


@contextlib.contextmanager
def hooks(modules: dict[str, torch.nn.Linear], deltas: dict[str, torch.Tensor]):
    """The runtime reference of a whole edit: one ``hook`` per module (keyed as the deltas)."""
    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            weight = f"{name}.weight"
            factors = tuple(deltas.get(weight + s) for s in FACTORS)
            change = factors if factors[0] is not None else (deltas[weight],)
            stack.enter_context(hook(module, change, deltas.get(f"{name}.bias")))
        yield


@contextlib.contextmanager
def hook(module: torch.nn.Linear, weight: tuple[torch.Tensor, ...], bias: torch.Tensor | None):
    """The runtime reference of the fold: module(x) + x dW^T (+ db), the module unchanged.
    ``weight``: (dW,), or the low-rank pair (A, B) with dW = B A, applied as (x A^T) B^T."""

    def add(_module, inputs, output):
        x = inputs[0].float()
        for factor in weight:  # x A^T then B^T: the low-rank runtime form
            x = torch.nn.functional.linear(x, factor.to(x.device).float())
        extra = x
        if bias is not None:
            extra = extra + bias.to(x.device).float()
        return (output.float() + extra).to(output.dtype)

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
