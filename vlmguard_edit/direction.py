"""Hidden states of the base LLM -> per-layer safety steering direction (SSD), with provenance.

For each selected decoder layer l, the residual stream at the OUTPUT of layer l (taken with a
forward hook, not ``hidden_states``, whose last entry is after the final norm) at the last
prompt token, for N harmful (q-) and N harmless (q+) anchor prompts:

    A_l = H_l(q-) - H_l(q+)              (N, d)  paired differences, not centred
    A_l = U S V^T                         SVD
    V_l = top-m rows of V^T               (m, d)  orthonormal; V_l[0] . mean(A_l) > 0

Layers above the deepest selected one are neither loaded nor run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .anchors import AnchorSet
from .checkpoint import (
    FLOAT_DTYPES,
    ModelSource,
    decode_provenance,
    default_device,
    read_provenance,
    read_tensor,
    save_with_provenance,
)
from .compat import family_of, forward_errors
from .errors import DirectionError, InputError, VlmguardError
from .fold import orthonormal
from .layout import text_config

log = logging.getLogger(__name__)

DIRECTION_FORMAT = "vlmguard-direction/1"


@dataclass
class Direction:
    """Per-layer orthonormal directions V_l (m, d), float32, with statistics and provenance."""

    vectors: dict[int, torch.Tensor]
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def rank(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def hidden_size(self) -> int:
        return next(iter(self.vectors.values())).shape[1]

    def save(self, path: Path) -> None:
        tensors = {
            f"layer.{layer}": self.vectors[layer].float().contiguous() for layer in self.layers
        }
        stats = {str(k): v for k, v in sorted(self.stats.items())}
        meta = {**self.meta, "stats": stats}  # stats last: as before, it wins over a meta key
        save_with_provenance(path, tensors, {"vlmguard.format": DIRECTION_FORMAT}, meta)

    @classmethod
    def load(cls, path: Path) -> Direction:
        """Read a direction file with the project's own safetensors reader: an interrupt
        (Ctrl-C, SIGTERM) while reading stays an interrupt (safetensors' reader turned one
        into "could not determine the shape")."""
        header, metadata = read_provenance(path, "direction file", DirectionError)
        vectors = {}
        for key, info in header.tensors.items():
            if not key.startswith("layer.") or not key[6:].isdigit():
                raise DirectionError(f"{path}: unexpected tensor {key!r} (expected layer.N)")
            if info.dtype not in FLOAT_DTYPES:
                raise DirectionError(f"{path}: {key} is {info.dtype}, not a float tensor")
            v = read_tensor(Path(path), info)
            half = v.dtype not in (torch.float32, torch.float64)
            v = v.float().reshape(1, -1) if v.ndim == 1 else v.float()  # (d,): one row
            # A half-precision unit vector is unit only to its precision: re-orthonormalised.
            vectors[int(key[6:])] = orthonormal(v, f"{path} {key}") if half else v
        if metadata.get("vlmguard.format") != DIRECTION_FORMAT or not vectors:
            raise DirectionError(f"{path} is not a vlmguard-edit direction file")
        shapes = {tuple(v.shape) for v in vectors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise DirectionError(f"{path}: layers have inconsistent shapes {sorted(shapes)}")
        meta = decode_provenance(metadata, ("vlmguard.format", "vlmguard.stats"))
        stats = {int(k): v for k, v in json.loads(metadata.get("vlmguard.stats", "{}")).items()}
        return cls(vectors, stats, meta)

    def midpoint(self, layer: int) -> float:
        """Halfway between the anchors' harmful and harmless mean projections on V_l[0]."""
        stats = self.stats.get(layer) or {}
        if "harmful_mean_proj" not in stats:
            raise DirectionError(f"the direction has no statistics for layer {layer}")
        return (stats["harmful_mean_proj"] + stats["harmless_mean_proj"]) / 2

    def select(self, layers: list[int], rank: int) -> dict[int, torch.Tensor]:
        """The top-``rank`` rows for each requested layer; errors name what is missing."""
        missing = [layer for layer in layers if layer not in self.vectors]
        if missing:
            raise DirectionError(
                f"the direction has no layer(s) {missing} (it has {self.layers}); recompute it "
                "with those layers or choose layers it covers"
            )
        if rank > self.rank:
            raise DirectionError(f"rank {rank} asked, but the direction holds rank {self.rank}")
        return {layer: self.vectors[layer][:rank] for layer in layers}


def svd_direction(
    harmful: torch.Tensor, harmless: torch.Tensor, rank: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """harmful, harmless: (N, d) last-token states. Returns V (rank, d) float32 and statistics."""
    h_minus = harmful.double()
    h_plus = harmless.double()
    diffs = h_minus - h_plus  # (N, d)
    if not torch.isfinite(diffs).all():
        raise DirectionError(
            "the anchor hidden states are not finite (nan or inf): the model overflowed in "
            "this dtype (try --dtype float32); nothing was written"
        )
    _, singular, vh = torch.linalg.svd(diffs, full_matrices=False)  # vh: (min(N, d), d)
    v = vh[:rank].clone()  # (m, d)
    mean = diffs.mean(dim=0)  # (d,)
    for i in range(rank):
        # SVD signs are arbitrary. Orient each row toward "harmful" (mean difference), and
        # fall back to the largest component when the mean is orthogonal, for determinism.
        score = mean @ v[i]
        if score.abs() < 1e-12:
            score = v[i][v[i].abs().argmax()]
        if score < 0:
            v[i] = -v[i]
    proj_minus = h_minus @ v[0]  # (N,)
    proj_plus = h_plus @ v[0]  # (N,)
    midpoint = (proj_minus.mean() + proj_plus.mean()) / 2
    correct = (proj_minus > midpoint).sum() + (proj_plus <= midpoint).sum()
    pooled = torch.sqrt((proj_minus.var() + proj_plus.var()) / 2).clamp_min(1e-12)
    if singular[:rank].min() <= 1e-12 * max(float(singular.max()), 1.0):
        raise DirectionError(
            "the harmful and harmless anchor states do not differ (singular values "
            f"{[round(float(x), 6) for x in singular[: max(rank, 3)]]}): the prompts may have "
            "lost their requests, or the layer sees none of them; nothing was written"
        )
    energy = singular**2
    stats = {
        "singular_values": [round(float(s), 6) for s in singular[: max(rank, 8)]],
        "explained_variance": [round(float(e), 6) for e in (energy / energy.sum())[:rank]],
        "separation_accuracy": round(float(correct) / (2 * len(diffs)), 6),
        "separation_d": round(float((proj_minus.mean() - proj_plus.mean()) / pooled), 6),
        "harmful_mean_proj": round(float(proj_minus.mean()), 6),
        "harmless_mean_proj": round(float(proj_plus.mean()), 6),
    }
    return v.float(), stats


def format_prompt(tokenizer: Any, request: str, template: str | None) -> tuple[str, bool]:
    """The prompt text and whether the tokenizer should add special tokens (BOS) itself.

    A chat template gets the request as plain content, or, where the template expects a list
    of parts (most VLM templates), as one text part; a prompt that does not contain its
    request is refused (it would silently measure an empty turn)."""
    if template is not None:
        return template.replace("{request}", request), True
    if not getattr(tokenizer, "chat_template", None):
        raise DirectionError(
            "the base LLM's tokenizer has no chat template; give one in the recipe "
            "(base_llm.template with a {request} placeholder) or with --template"
        )
    for content in (request, [{"type": "text", "text": request}]):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        except Exception:  # a template that cannot take this content form: try the other
            continue
        if request in text:
            return text, False
    raise DirectionError(
        f"the chat template does not put the request into the prompt (tried plain and list "
        f"content for {request[:40]!r}); give a template with --template '... {{request}} ...'"
    )


def encode(tokenizer: Any, text: str, add_special: bool) -> list[int]:
    """Token ids of a prompt. A plain-template prompt (``add_special``) starts with BOS, as
    the chat template's prompts do, even where the tokenizer does not add one itself."""
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_special and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


@torch.no_grad()
def last_token_states(
    decoder: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    add_special: bool,
    layers: list[int],
    batch_size: int,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Residual stream at the output of each layer in ``layers``, at each prompt's last token.

    Prompts are right-padded, so positions and causal attention of the real tokens are exactly
    those of an unbatched run, and the last real token is picked by its index.
    """
    device = next(decoder.parameters()).device
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden.detach()

        return hook

    handles = [decoder.layers[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    encoded = [encode(tokenizer, p, add_special) for p in prompts]
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    try:
        batches = range(0, len(encoded), batch_size)
        for start in tqdm(batches, desc="anchor batches", unit="batch", disable=not progress):
            batch = encoded[start : start + batch_size]
            longest = max(len(ids) for ids in batch)
            input_ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            with forward_errors(family_of(decoder)):
                decoder(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
                )
            last = torch.tensor([len(ids) - 1 for ids in batch], device=device)
            rows = torch.arange(len(batch), device=device)
            for layer in layers:
                out[layer].append(captured[layer][rows, last].float().cpu())  # (B, d)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of exactly the weights that determine the direction (what was loaded)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _resolve_dtype(name: str, device: str) -> Any:
    if name == "auto":
        return torch.float32 if device == "cpu" else "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_text_decoder(
    source: ModelSource,
    max_layer: int,
    is_vlm: bool,
    device: str,
    dtype: str,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> tuple[torch.nn.Module, Any]:
    """Load layers 0..max_layer of a (V)LM's text decoder and its tokenizer; nothing above."""
    from transformers import AutoTokenizer

    model = load_truncated(
        source, max_layer, is_vlm, device, dtype, allow_pickle, trust_remote_code
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DirectionError(
            f"cannot load the tokenizer of {source.id} ({exc.__class__.__name__}); the model "
            "folder needs its tokenizer files to wrap the anchor prompts"
        ) from exc
    return model.get_decoder(), tokenizer


def load_truncated(
    source: ModelSource,
    max_layer: int,
    is_vlm: bool,
    device: str,
    dtype: str,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> torch.nn.Module:
    """A (V)LM with text layers 0..max_layer only (the vision tower of a VLM whole)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    has_safetensors = any(source.path.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise InputError(
            f"{source.id} has no safetensors weights; loading pickle weights can run code. Pass "
            "--allow-pickle only if you trust its source"
        )
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if is_vlm else config
    text.num_hidden_layers = max_layer + 1
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[: max_layer + 1]
    model_class = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    placement: dict[str, Any] = {}
    if device == "auto":  # spread over every GPU (and CPU RAM) with accelerate's device_map
        if importlib.util.find_spec("accelerate") is None:
            raise InputError("--device auto needs accelerate: pip install accelerate")
        placement["device_map"] = "auto"
    verbosity = transformers.logging.get_verbosity()
    # The skipped upper layers would be reported as unexpected keys: expected, so quiet.
    transformers.logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(
            source.path,
            config=config,
            dtype=_resolve_dtype(dtype, device),
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            **placement,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not placement:
        model.to(device)
    return model.eval()


def compute_direction(
    source: ModelSource,
    anchors: AnchorSet,
    layers: list[int],
    rank: int,
    *,
    is_vlm: bool = False,
    template: str | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    layer_map: dict[int, int] | None = None,
) -> Direction:
    """Compute the SSD from a base LLM, or from a VLM's own language model (``is_vlm``).

    ``layer_map`` (VLM layer -> the source's layer, see Layout.direction_layer) keys the
    result by VLM layer where the numbering differs (mllama); identity when omitted."""
    numbered_for_vlm = layer_map is not None  # recorded even where the map is the identity
    layer_map = {layer: (layer_map or {}).get(layer, layer) for layer in layers}
    measured = sorted(set(layer_map.values()))
    check_direction_request(source, anchors, measured, rank, is_vlm)
    device = default_device(device)
    decoder, tokenizer = load_text_decoder(
        source, max(measured), is_vlm, device, dtype, allow_pickle, trust_remote_code
    )
    prompts, add_special = _anchor_prompts(tokenizer, anchors, template)
    log.info("computing hidden states for %d anchor pairs on %s", len(anchors), device)
    states = {
        kind: last_token_states(
            decoder, tokenizer, texts, add_special, measured, batch_size, progress
        )
        for kind, texts in prompts.items()
    }
    vectors, stats = {}, {}
    for layer in layers:
        at = layer_map[layer]
        vectors[layer], stats[layer] = svd_direction(
            states["harmful"][at], states["harmless"][at], rank
        )
    meta = {
        "base_model": "self" if is_vlm else source.id,
        "source_model": source.id,
        "base_revision": source.revision,
        "weights_sha256": weights_sha256(decoder),
        **_anchor_meta(anchors, template, prompts["harmful"][0]),
        "rank": rank,
        "layers": list(layers),
        **(
            {"source_layers": {str(k): v for k, v in layer_map.items()}} if numbered_for_vlm else {}
        ),
        "hidden_size": int(next(iter(vectors.values())).shape[1]),
        "dtype": str(next(decoder.parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "tool_version": __version__,
    }
    return Direction(vectors, stats, meta)


def _anchor_meta(anchors: AnchorSet, template: str | None, example: str) -> dict[str, Any]:
    """The provenance of the prompts a direction was measured on."""
    return {
        "anchors": anchors.name,
        "anchors_sha256": anchors.sha256,
        "num_anchor_pairs": len(anchors),
        "template": template if template is not None else "tokenizer chat template",
        "example_prompt": example,
    }


def _anchor_prompts(
    tokenizer: Any, anchors: AnchorSet, template: str | None
) -> tuple[dict[str, list[str]], bool]:
    """Every anchor request in the chat template (or ``template``), by kind, and whether the
    tokenizer should add its special tokens (not where the template already holds them)."""
    prompts: dict[str, list[str]] = {}
    add_special = True
    for kind, requests in (("harmful", anchors.harmful), ("harmless", anchors.harmless)):
        texts = []
        for request in requests:
            text, add_special = format_prompt(tokenizer, request, template)
            texts.append(text)
        prompts[kind] = texts
    return prompts, add_special


def check_direction_request(
    source: ModelSource, anchors: AnchorSet, layers: list[int], rank: int, is_vlm: bool
) -> None:
    """Everything about a direction request that can be refused from configs alone."""
    config = _read_config(source)
    text = text_config(config) if is_vlm else config
    num, hidden = int(text["num_hidden_layers"]), int(text["hidden_size"])
    bad = [layer for layer in layers if not 0 <= layer < num]
    if bad:
        raise DirectionError(f"layer(s) {bad} out of range: {source.id} has layers 0..{num - 1}")
    if rank > len(anchors):
        raise DirectionError(
            f"rank {rank} needs at least {rank} anchor pairs; the anchor set has {len(anchors)}"
        )
    if rank > hidden:
        raise DirectionError(f"rank {rank} is larger than the hidden size {hidden}")


def _read_config(source: ModelSource) -> dict[str, Any]:
    path = source.path / "config.json"
    if not path.is_file():
        raise InputError(f"{source.id} is not a model: no config.json in {source.path}")
    return json.loads(path.read_text("utf-8"))


def check_base_matches(base: ModelSource, vlm_config: dict[str, Any]) -> list[str]:
    """Compare the base LLM's config with the VLM's text model; configs only.

    A different hidden size is an error (the direction cannot apply). A different depth,
    ``rms_norm_eps`` or ``rope_theta`` is returned (and logged) as a warning: layer l of the
    base LLM is used for layer l of the VLM, and such differences mean the hidden states
    only approximate each other.
    """
    base_config = _read_config(base)
    vlm_text = text_config(vlm_config)
    base_hidden = int(base_config["hidden_size"])
    vlm_hidden = int(vlm_text["hidden_size"])
    if base_hidden != vlm_hidden:
        raise DirectionError(
            f"hidden size of the base LLM {base.id} ({base_hidden}) differs from the VLM's text "
            f"model ({vlm_hidden}); use the base LLM this VLM was built on, or --base-llm self"
        )
    warnings = []
    for name in ("num_hidden_layers", "rms_norm_eps", "rope_theta"):
        ours, theirs = base_config.get(name), vlm_text.get(name)
        if name == "num_hidden_layers" and theirs is not None:  # mllama: without cross-attention
            theirs = int(theirs) - len(vlm_text.get("cross_attention_layers") or ())
        if name == "rope_theta":  # transformers 5 may keep it under rope_parameters
            ours = ours or (base_config.get("rope_parameters") or {}).get("rope_theta")
            theirs = theirs or (vlm_text.get("rope_parameters") or {}).get("rope_theta")
        if ours is not None and theirs is not None and ours != theirs:
            warnings.append(
                f"{name} differs: base LLM {base.id} has {ours}, the VLM's text model {theirs}"
                + (
                    "; the base LLM's layer numbering is used for the VLM"
                    if name == "num_hidden_layers"
                    else "; the base LLM's hidden states only approximate the VLM's"
                )
            )
    for warning in warnings:
        log.warning(warning)
    return warnings


def weight_drift(
    base: ModelSource, vlm: Any, layout: Any, layers: list[int]
) -> dict[str, dict[str, float]]:
    """How far the VLM's language model has moved from its base LLM, per selected layer and
    writer: relative difference ||W_vlm - W_base|| / ||W_base|| and cosine similarity of the
    flattened matrices (one pair in memory at a time). Empty when the base LLM has no
    safetensors checkpoint or its keys are not the usual ``model.layers.N`` ones."""
    from .checkpoint import open_checkpoint

    try:
        base_checkpoint = open_checkpoint(base.path)
    except VlmguardError:
        return {}
    report = {}
    for layer in layers:
        if layer in layout.cross_layers:
            continue  # mllama's cross-attention layers have no counterpart in the base LLM
        base_layer = layout.direction_layer(layer, in_base=True)
        for writer in layout.writers[layer]:
            # The same tensor in a text-only LLM: the VLM key below its layer, under
            # model.layers.<base layer> (fused MoE experts included: no .weight suffix).
            below = writer.weight.removeprefix(f"{layout.layer_prefix}.{layer}.")
            key = f"model.layers.{base_layer}.{below}"
            if key not in base_checkpoint.key_to_file:
                return {}
            ours = vlm.read(writer.weight).float().flatten()
            theirs = base_checkpoint.read(key).float().flatten()
            if ours.shape != theirs.shape:
                return {}
            report[f"{layer}.{writer.module}"] = {
                "relative_difference": float((ours - theirs).norm() / theirs.norm()),
                "cosine": float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0)),
            }
    return report
