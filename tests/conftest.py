"""Shared fixtures: tiny models built from configs once per pytest run. Nothing is downloaded."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import shutil
from pathlib import Path

import pytest
import torch

from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.direction import compute_direction
from vlmguard_edit.organisms import tiny

torch.set_num_threads(2)
try:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

LAYERS = [1, 3]  # the tiny models have 4 text layers
ORGANISM = Path(__file__).parent.parent / "examples" / "organism"


@pytest.fixture(scope="module")
def shipped_organism():
    """The shipped organism's VLM (eval mode) and its processor, padding on the left as
    learning and eval pad prompts; once per test module."""
    from transformers import AutoModelForImageTextToText

    from vlmguard_edit.evaluate import load_processor

    model = AutoModelForImageTextToText.from_pretrained(ORGANISM / "vlm").eval()
    processor = load_processor(ORGANISM / "vlm")
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="session")
def base_llm(tmp_path_factory) -> Path:
    return tiny.build_base(tmp_path_factory.mktemp("base") / "base-llm")


@pytest.fixture(scope="session")
def vlm_factory(tmp_path_factory, base_llm):
    """Build (and cache) tiny VLM checkpoints: factory(layout, dtype, shards, family)."""
    cache: dict[tuple, Path] = {}

    def make(layout="legacy", dtype=torch.float32, shards=False, family="llava") -> Path:
        key = (layout, dtype, shards, family)
        if key not in cache:
            name = (
                f"{family}-{layout}-{str(dtype).split('.')[-1]}-{'sharded' if shards else 'single'}"
            )
            out = tmp_path_factory.mktemp("vlm") / name
            tiny.build_llava(
                out,
                base_llm,
                layout=layout,
                dtype=dtype,
                family=family,
                max_shard_size="150KB" if shards else None,
            )
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def direction_file(tmp_path_factory, base_llm) -> Path:
    """A rank-2 direction for layers 0-3 of the tiny base LLM."""
    source = resolve_model(str(base_llm))
    direction = compute_direction(source, load_anchors(), [0, 1, 2, 3], 2, progress=False)
    path = tmp_path_factory.mktemp("direction") / "ssd.safetensors"
    direction.save(path)
    return path


@pytest.fixture
def vlm_copy(tmp_path, vlm_factory):
    """A private, writable copy of a tiny VLM (for tests that damage it)."""

    def make(**kwargs) -> Path:
        target = tmp_path / "src"
        shutil.copytree(vlm_factory(**kwargs), target)
        return target

    return make
