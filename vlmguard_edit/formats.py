"""Directions written by other tools, read into a ``Direction`` (``--direction-format``).

Every format numbers its layers its own way; each reader converts to this project's
convention (layer l = the residual stream at the OUTPUT of text block l, 0-based) and records
the conversion in the provenance. Vectors are orthonormalised in float32 (an fp16 unit vector
is unit only to fp16 precision). ``.pt`` files are read with ``torch.load(weights_only=True)``:
tensors and plain containers only, never a pickled object.

- refusal-direction (andyrdt/refusal_direction): ``direction.pt``, one [d] tensor (float64,
  not normalised), and ``direction_metadata.json`` beside it (``{"pos", "layer"}``); layer L
  is the input of block L, the output of block L-1.
- llm-abliteration (jim-plus): a ``torch.save`` dict of ``refusenorm_L`` / ``refuse_L`` [d];
  L indexes ``hidden_states`` (the output of block L-1).
- sumandora: one [1, d] fp16 unit tensor at the input of block int(0.6 N).
- repeng: a GGUF control vector (``controlvector`` architecture), tensors ``direction.L`` at
  the output of block L.
- safetensors: one (d,) or (m, d) tensor per layer, keys ending in the layer number, in this
  project's convention (the file says nothing about its provenance: a warning says so).

A format holding one vector measured at one layer (refusal-direction, sumandora) gives that
vector at every layer, as those tools apply it; ``--layers`` chooses where it is folded.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from .errors import DirectionError

log = logging.getLogger(__name__)

FORMATS = ("native", "refusal-direction", "llm-abliteration", "sumandora", "repeng", "safetensors")
_CONVENTIONS = {
    "refusal-direction": "layer L = input of block L = output of block L-1",
    "llm-abliteration": "hidden_states[L] = input of block L = output of block L-1",
    "sumandora": "input of block int(0.6 N) = output of block int(0.6 N) - 1",
    "repeng": "direction.L = output of block L",
    "safetensors": "output of block L (this project's convention; no provenance in the file)",
}


def import_direction(path: Path, fmt: str, num_layers: int, hidden_size: int):
    """The direction in ``path`` (written by the tool ``fmt``) for a model with
    ``num_layers`` text blocks of width ``hidden_size``."""
    from .direction import Direction

    readers = {
        "refusal-direction": _refusal_direction,
        "llm-abliteration": _llm_abliteration,
        "sumandora": _sumandora,
        "repeng": _repeng,
        "safetensors": _bare_safetensors,
    }
    if fmt not in readers:
        raise DirectionError(f"unknown direction format {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DirectionError(f"direction file {path} not found")
    vectors, theirs = readers[fmt](path, num_layers)
    vectors = {layer: _checked(v, path, layer, hidden_size) for layer, v in vectors.items()}
    bad = sorted(layer for layer in vectors if not 0 <= layer < num_layers)
    if bad:
        raise DirectionError(
            f"{path.name}: layer(s) {bad} in this project's numbering ({_CONVENTIONS[fmt]}) "
            f"match no text block of this model (0..{num_layers - 1})"
        )
    meta = {
        "imported_from": fmt,
        "source_file": path.name,
        "layer_convention": _CONVENTIONS[fmt],
        "source_layers": {str(layer): theirs[layer] for layer in sorted(vectors)},
    }
    return Direction(dict(sorted(vectors.items())), meta=meta)


def _checked(v, path: Path, layer: int, hidden_size: int):
    if v.ndim not in (1, 2) or v.shape[-1] != hidden_size:
        raise DirectionError(
            f"{path.name}: the vector for layer {layer} has shape {list(v.shape)}; this model's "
            f"hidden size is {hidden_size} (a direction for another model?)"
        )
    from .fold import orthonormal  # torch, imported only when a direction is read

    return orthonormal(v.reshape(-1, hidden_size), f"{path.name} layer {layer}")


def load_pt(path: Path) -> Any:
    """A ``torch.save`` file of tensors (and plain containers), never a pickled object."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DirectionError(
            f"{path.name} is not a plain tensor file (torch.load with weights_only=True refused "
            f"it: {first[:160]}); vlmguard-edit never unpickles objects"
        ) from None


def _tensor(value: Any, path: Path, what: str):
    import torch

    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise DirectionError(f"{path.name}: {what} is {type(value).__name__}, not a float tensor")
    return value.detach().to("cpu")


def _refusal_direction(path: Path, num_layers: int):
    meta_path = path.with_name("direction_metadata.json")
    if not meta_path.is_file():
        raise DirectionError(
            f"{path.name}: refusal-direction keeps the layer in direction_metadata.json beside "
            "it; that file is missing"
        )
    try:
        layer = int(json.loads(meta_path.read_text("utf-8"))["layer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DirectionError(f"{meta_path.name}: expected {{'pos', 'layer'}}: {exc}") from None
    v = _tensor(load_pt(path), path, "the saved object")
    return _everywhere(v, layer - 1, num_layers), _theirs(layer, num_layers)


def _llm_abliteration(path: Path, num_layers: int):
    saved = load_pt(path)
    if not isinstance(saved, dict):
        raise DirectionError(f"{path.name}: expected a dict of refuse_L / refusenorm_L tensors")
    found: dict[int, Any] = {}
    theirs: dict[int, Any] = {}
    for key, value in saved.items():
        match = re.fullmatch(r"refuse(norm)?_(\d+)", str(key))
        if match is None:
            continue
        layer = int(match.group(2)) - 1  # hidden_states[L] is block L-1's output
        if match.group(1) or layer not in found:  # refusenorm_L wins over refuse_L
            found[layer], theirs[layer] = _tensor(value, path, key), key
    if not found:
        raise DirectionError(f"{path.name}: no refuse_L or refusenorm_L tensors in the dict")
    return found, theirs


def _sumandora(path: Path, num_layers: int):
    v = _tensor(load_pt(path), path, "the saved object")
    layer = int(0.6 * num_layers)
    return _everywhere(v, layer - 1, num_layers), _theirs(layer, num_layers)


def _repeng(path: Path, num_layers: int):
    try:
        import gguf
    except ImportError:
        raise DirectionError(
            "reading a GGUF control vector needs the gguf package: "
            "pip install 'vlmguard-edit[gguf]'"
        ) from None
    import torch

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise DirectionError(f"{path.name} is not a GGUF file: {exc}") from None
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "controlvector":
        raise DirectionError(f"{path.name}: not a GGUF control vector (architecture controlvector)")
    found, theirs = {}, {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if match:
            layer = int(match.group(1))
            found[layer] = torch.tensor(tensor.data.astype("float32")).reshape(-1)
            theirs[layer] = tensor.name
    if not found:
        raise DirectionError(f"{path.name}: no direction.L tensors")
    return found, theirs


def _bare_safetensors(path: Path, num_layers: int):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DirectionError(f"{path.name} is not a safetensors file: {exc}") from None
    found, theirs = {}, {}
    for key, value in tensors.items():
        match = re.search(r"(\d+)\D*$", key)
        if match is None:
            raise DirectionError(f"{path.name}: tensor {key!r} names no layer number")
        found[int(match.group(1))], theirs[int(match.group(1))] = _tensor(value, path, key), key
    if not found:
        raise DirectionError(f"{path.name}: no tensors")
    log.warning(
        "%s is a bare safetensors file: no provenance (which model, which anchors, which "
        "layer convention); its layer numbers are taken as block outputs, this project's",
        path.name,
    )
    return found, theirs


def _everywhere(v, measured: int, num_layers: int) -> dict[int, Any]:
    """One vector measured at one layer, at every layer (as the tool that wrote it applies it)."""
    if not 0 <= measured < num_layers:
        raise DirectionError(
            f"the direction was measured at block {measured}'s output, which this model "
            f"(text blocks 0..{num_layers - 1}) does not have"
        )
    return dict.fromkeys(range(num_layers), v)


def _theirs(layer: int, num_layers: int) -> dict[int, Any]:
    return dict.fromkeys(range(num_layers), f"measured at their layer {layer}")
