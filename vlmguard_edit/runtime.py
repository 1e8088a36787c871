"""Forward-hook reference implementation: apply the map to writer outputs at run time.

``WriterHooks`` applies (I + beta V_l^T V_l) to the outputs of the same modules the fold edits.
A folded checkpoint must match an unmodified model running these hooks to float32 rounding;
that equality is the core correctness test of vlmguard-edit.
"""

from __future__ import annotations

import contextlib

import torch

from .families import FAMILIES, LLAMA_WRITERS
from .fold import map_hidden


def text_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a (V)LM's language model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for _ in range(3):  # descend .model wrappers until the layer list appears
        if hasattr(decoder, "layers"):
            return decoder.layers
        decoder = getattr(decoder, "model", decoder)
    raise ValueError(f"cannot find the text decoder layers of {type(model).__name__}")


def writer_modules(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """Per layer, the modules whose outputs the fold maps (for fused MoE experts: the experts
    module, whose output is the routing-weighted sum of every expert's down projection)."""
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type)
    writers = family.writers if family else LLAMA_WRITERS
    fused = dict(family.fused) if family else {}
    stand_ins = dict(family.alternatives) if family else {}

    def module(layer: torch.nn.Module, name: str) -> torch.nn.Module:
        for candidate in (name, *stand_ins.get(name, ())):
            with contextlib.suppress(AttributeError):
                return layer.get_submodule(candidate)
        if name not in fused:
            raise AttributeError(f"{type(layer).__name__} has no {name}")
        return layer.get_submodule(fused[name][0])

    def extras(layer: torch.nn.Module) -> list[torch.nn.Module]:
        found = []
        for name in family.extra_writers if family else ():
            try:
                found.append(layer.get_submodule(name))
            except AttributeError:
                continue  # a layer without it (e.g. a dense Llama 4 layer)
        return found

    cross: set[int] = set()
    if family and family.cross_layers_key:
        text = model.config.get_text_config(decoder=True)
        cross = set(getattr(text, family.cross_layers_key) or ())
    layers = text_layers(model)
    return {
        i: [module(layer, name) for name in (family.cross_writers if i in cross else writers)]
        + extras(layer)
        for i, layer in enumerate(layers)
    }


class WriterHooks:
    """Context manager: while active, every writer of layer l maps its output by M_l."""

    def __init__(
        self,
        model: torch.nn.Module,
        vectors: dict[int, torch.Tensor],
        beta: float,
        attention_only: bool = False,  # image-gap: the attention output projection only
    ):
        self.model = model
        self.vectors = vectors
        self.beta = beta
        self.attention_only = attention_only
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> WriterHooks:
        modules = writer_modules(self.model)
        for layer, v in self.vectors.items():
            for module in modules[layer][:1] if self.attention_only else modules[layer]:
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


class ProjectorShiftHook:
    """Runtime reference of the projector-shift edit: adds gamma * u to the projector output."""

    def __init__(self, model: torch.nn.Module, u: torch.Tensor, gamma: float):
        # The Linear whose bias convert shifts (its output is the image tokens' embeddings).
        family = FAMILIES[model.config.model_type]
        names = {key.removesuffix(".bias") for key in family.projector_bias}
        self.module = next(m for name, m in model.named_modules() if name in names)
        self.u, self.gamma = u, gamma
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> ProjectorShiftHook:
        def hook(_module, _inputs, output):
            return output + (self.gamma * self.u.float()).to(output.dtype)

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


class SteerHooks:
    """The paper's runtime intervention on the residual stream (decoder layer outputs).

    mode "project":  h' = h - h V^T V
    mode "steer":    h* = h + alpha * g * (h V^T V),   g = 1[h_last . V[0] > threshold]

    The gate g is decided per sequence, at each layer, from the last prompt token (prompts are
    left-padded by generate, so it is position -1 of the prefill). ``positions="prompt"``
    applies the map to the prompt only (the prefill); ``"all"`` also to generated tokens.
    A forward pass with more than one position is taken as a prefill (generation with a
    KV cache feeds one token at a time after it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        vectors: dict[int, torch.Tensor],
        mode: str = "steer",
        alpha: float = 1.0,
        thresholds: dict[int, float] | None = None,
        positions: str = "prompt",
    ):
        if mode not in ("steer", "project") or positions not in ("prompt", "all"):
            raise ValueError(f"bad mode {mode!r} or positions {positions!r}")
        self.model = model
        self.vectors = vectors
        self.mode = mode
        self.alpha = alpha
        self.thresholds = thresholds or {}
        self.positions = positions
        self.gates: dict[int, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SteerHooks:
        layers = text_layers(self.model)
        for layer, v in self.vectors.items():
            self.handles.append(layers[layer].register_forward_hook(self._hook(layer, v)))
        return self

    def _hook(self, layer: int, v: torch.Tensor):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            prefill = hidden.shape[1] > 1
            if not prefill and self.positions == "prompt":
                return output
            if self.mode == "project":
                new = map_hidden(hidden, v, -1.0)  # h - h V^T V
            else:
                vv = v.to(device=hidden.device, dtype=torch.float32)
                h32 = hidden.float()
                along = (h32 @ vv.T) @ vv  # (B, T, d) @ (d, m) @ (m, d) -> (B, T, d)
                if prefill:
                    score = h32[:, -1] @ vv[0]  # (B,)
                    self.gates[layer] = (score > self.thresholds.get(layer, 0.0)).float()
                gate = self.gates.get(layer, torch.zeros(hidden.shape[0], device=hidden.device))
                new = (h32 + self.alpha * gate[:, None, None] * along).to(hidden.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.gates.clear()
