"""Forward-hook reference implementation: apply the map to writer outputs at run time.

``WriterHooks`` applies (I + beta V_l^T V_l) to the outputs of the same modules the fold edits.
A folded checkpoint must match an unmodified model running these hooks to float32 rounding;
that equality is the core correctness test of vlmguard-edit.
"""

from __future__ import annotations

import torch

from .fold import map_hidden
from .layout import FAMILIES, LLAMA_WRITERS


def text_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a (V)LM's language model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for _ in range(3):  # descend .model wrappers until the layer list appears
        if hasattr(decoder, "layers"):
            return decoder.layers
        decoder = getattr(decoder, "model", decoder)
    raise ValueError(f"cannot find the text decoder layers of {type(model).__name__}")


def writer_modules(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    model_type = getattr(model.config, "model_type", None)
    writers = FAMILIES[model_type].writers if model_type in FAMILIES else LLAMA_WRITERS
    layers = text_layers(model)
    return {i: [layer.get_submodule(name) for name in writers] for i, layer in enumerate(layers)}


class WriterHooks:
    """Context manager: while active, every writer of layer l maps its output by M_l."""

    def __init__(self, model: torch.nn.Module, vectors: dict[int, torch.Tensor], beta: float):
        self.model = model
        self.vectors = vectors
        self.beta = beta
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> WriterHooks:
        modules = writer_modules(self.model)
        for layer, v in self.vectors.items():
            for module in modules[layer]:
                self.handles.append(module.register_forward_hook(self._hook(v)))
        return self

    def _hook(self, v: torch.Tensor):
        def hook(_module, _inputs, output):
            return map_hidden(output, v, self.beta)

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
