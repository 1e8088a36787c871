"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's model shards (not vlmguard-edit's own files)."""
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        if shard.name.startswith("vlmguard"):
            continue
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                out[key] = handle.get_tensor(key)
    return out


def spy_on_reader_tower(monkeypatch, organism) -> list:
    """Two tower-pretraining steps, and each pretrain_reader_tower call's (tower, pixels
    function) recorded, for tests of how a reader's tower is trained."""
    monkeypatch.setattr(organism, "READER_TOWER_STEPS", 2)
    seen = []
    real = organism.pretrain_reader_tower

    def spy(tower, pixels, *rest):
        seen.append((tower, pixels))
        return real(tower, pixels, *rest)

    monkeypatch.setattr(organism, "pretrain_reader_tower", spy)
    return seen
