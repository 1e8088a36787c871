"""The Python API: the CLI's operations as functions (``from vlmguard_edit.api import ...``;
the package's modules of the same names, ``vlmguard_edit.convert`` and so on, are the layers
underneath, so the API lives in its own module).

Typed keyword options, no printing (progress bars only, ``progress=False`` for none), errors
as exceptions (``vlmguard_edit.errors.VlmguardError`` and its kinds: InputError, PlanError,
DirectionError, RecipeError). The CLI is a thin layer over these.

    from vlmguard_edit.api import convert, evaluate

    result = convert("examples/organism/vlm", "organism-guarded",
                     recipe="recipes/organism.yaml", progress=False)
    report = evaluate("organism-guarded", against="examples/organism/vlm", limit=24)
    report["systems"]["model"]["settings"]["blank"]["harmful_refusal"]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .errors import InputError
from .recipe_data import SELF


def recipe_with(recipe: Any = None, **fields: Any):
    """A Recipe from a YAML path, a Recipe, or the defaults (the default edit, or another
    ``mode``'s own defaults), with ``fields`` replacing its values (None leaves a value as
    it is; epochs or learning_rate without search replace the recipe's search, as on the
    command line); every field is checked as a recipe file's key is (one validator)."""
    from .recipes import base_recipe, load_recipe, training_length
    from .recipes import recipe_with as checked

    if isinstance(recipe, (str, Path)):
        base = load_recipe(recipe)
    else:  # no recipe: the default edit, or the --mode given with plain values
        base = recipe or base_recipe(fields.get("mode"))
    given = {k: v for k, v in training_length(fields).items() if v is not None}
    return checked(base, given)


def file_mode(path: str | Path) -> str:
    """The edit kind a parameter file is for, from its header alone: a learned edit file
    names its kind, an image-gap direction says so; any other direction (or a file another
    tool wrote) is folded as the design's projection of the writers unless another --mode
    is given."""
    import json

    from .checkpoint import read_provenance
    from .errors import DirectionError
    from .learned import EDIT_FORMAT, KIND

    try:
        _, metadata = read_provenance(Path(path), "direction or edit file", DirectionError)
    except DirectionError:  # not a safetensors file: another tool's format (--direction-format)
        return "writers"
    if metadata.get("vlmguard.format") == EDIT_FORMAT:
        return metadata.get("vlmguard.kind", KIND)
    with contextlib.suppress(ValueError):  # a direction's metadata values are JSON
        if json.loads(metadata.get("vlmguard.kind", "null")) == "image-gap":
            return "image-gap"
    return "writers"


def convert(
    source: str | Path,
    output: str | Path,
    *,
    recipe: Any = None,
    direction: str | Path | None = None,
    direction_format: str = "native",
    adapter_out: str | Path | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    progress: bool = True,
    **recipe_fields: Any,
):
    """Write the guarded copy of ``source`` (a folder or Hub id) to ``output``; returns the
    ``ConvertResult`` (its plan, and the record written to vlmguard.json). ``recipe``: a YAML
    path or a Recipe; ``recipe_fields`` (mode, layers, rank, beta, anchors, epochs, ...)
    replace its values. ``adapter_out``: also write the edit as a PEFT LoRA adapter;
    ``allow_pickle`` / ``trust_remote_code``: only when you trust the source."""
    from .convert import ConvertOptions
    from .convert import convert as run

    opts = ConvertOptions(
        str(source),
        Path(output),
        recipe_with(recipe, **recipe_fields),
        direction_file=Path(direction) if direction else None,
        direction_format=direction_format,
        base_model=base_model,
        revision=revision,
        overwrite=overwrite,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    result = run(opts)
    if adapter_out and not dry_run:
        from .checkpoint import resolve_model

        local = resolve_model(str(source), revision).path
        adapter(output, local, adapter_out, overwrite=overwrite)
    return result


def calibrate(
    source: str | Path,
    output: str | Path,
    *,
    recipe: Any = None,
    revision: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    progress: bool = True,
    **recipe_fields: Any,
):
    """Learn the edit of ``source`` (the recipe's mode, a learned kind; without a recipe,
    the default edit, as the command does) and write it to the edit file ``output``;
    returns the ``learned.Edit`` (its calibration report in ``.meta["calibration"]``)."""
    from .convert import ConvertOptions
    from .convert import calibrate as run

    resolved = recipe_with(recipe, **recipe_fields)
    opts = ConvertOptions(
        str(source),
        Path(output),
        resolved,
        revision=revision,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    return run(opts)


def direction(
    recipe: Any,
    output: str | Path,
    *,
    vlm: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
):
    """Compute the recipe's base LLM's safety steering direction (``base_llm.id``; 'self':
    the language model of ``vlm``, text only) at its layers (default: the upper half of the
    text layers), numbered as ``vlm``'s where one is given, and save it to ``output``;
    returns the ``Direction``."""
    from .anchors import load_anchors
    from .checkpoint import open_checkpoint, resolve_model
    from .direction import compute_direction
    from .layout import find_layout

    base = recipe.base_llm
    is_self = base.id == SELF
    source = resolve_model(
        vlm if is_self else base.id, None if is_self else base.revision, allow_pickle
    )
    layout = None
    if vlm:
        target = source if is_self else resolve_model(str(vlm), None, allow_pickle)
        checkpoint = open_checkpoint(target.path)
        layout = find_layout(checkpoint.config, checkpoint.keys)
    layers = recipe.layers if recipe.layers is not None else _upper_half(source, layout)
    result = compute_direction(
        source,
        load_anchors(recipe.anchors),
        layers,
        recipe.rank,
        is_vlm=is_self,
        template=base.template,
        batch_size=recipe.batch_size,
        device=device,
        dtype=dtype,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        progress=progress,
        layer_map=layout.direction_layers(layers, in_base=not is_self) if layout else None,
    )
    result.save(Path(output))
    return result


def _upper_half(source: Any, layout: Any) -> list[int]:
    """The provisional default layers of a direction: the upper half of the text layers."""
    import json

    from .kinds.base import upper_half
    from .layout import text_config

    if layout is not None:
        return upper_half(layout.num_layers)
    config = json.loads((source.path / "config.json").read_text("utf-8"))
    return upper_half(int(text_config(config)["num_hidden_layers"]))


def evaluate(
    model: str | Path,
    output: str | Path | None = None,
    *,
    against: str | Path | None = None,
    settings: tuple[str, ...] = ("text", "blank", "typographic", "noise"),
    harmful: str | Path | None = None,
    benign: str | Path | None = None,
    contrast: str | Path | bool | None = None,
    image_folder: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str | None = None,
    dtype: str = "auto",
    utility: bool = True,
    progress: bool = True,
    runtime: Any = None,
    guard: Any = None,
    attack_eps: tuple[int, ...] = (16, 64),
    attack_steps: int = 200,
    attack_target: str | None = None,
) -> dict[str, Any]:
    """Refusal, compliance, KL to ``against`` and image understanding of ``model`` in each
    setting; returns the report (and writes it to ``output`` when given: eval.json,
    report.md, refusal.png). ``harmful`` / ``benign`` / ``contrast``: JSONL prompt files
    (None: the shipped sets; ``contrast``, harmless requests with harmful-sounding words, is
    skipped with False); ``image_folder``: the images of the "folder" setting;
    ``runtime``: a hook factory, evaluated as the system "runtime" on the original;
    ``guard``: a judge.GuardJudge for the answers to harmful prompts; ``attack_*``: the
    "adversarial" setting's budgets (1/255 units), PGD steps and target prefix."""
    from . import evaluate as ev

    opts = eval_options(
        settings=settings,
        harmful=harmful,
        benign=benign,
        contrast=contrast,
        image_folder=image_folder,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        dtype=dtype,
        progress=progress,
        utility=utility,
    )
    opts.guard = guard
    opts.attack = ev.AttackOptions(tuple(attack_eps), attack_steps, attack_target)
    report = evaluate_with(model, against, opts, runtime)
    if output is not None:
        ev.write_report(report, Path(output))
    return report


def eval_options(
    *,
    settings,
    harmful,
    benign,
    image_folder,
    limit,
    batch_size,
    max_new_tokens,
    device,
    dtype,
    progress,
    utility,
    contrast=None,
):
    """``evaluate.EvalOptions`` from ``evaluate``'s keyword options: prompt files read, the
    device defaulted (the CLI builds its options with this too)."""
    from . import evaluate as ev
    from .checkpoint import default_device

    return ev.EvalOptions(
        settings=tuple(settings),
        harmful=ev.load_prompts(harmful, "harmful"),
        benign=ev.load_prompts(benign, "benign"),
        contrast=[] if contrast is False else ev.load_prompts(contrast, "contrast"),
        image_folder=Path(image_folder) if image_folder else None,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=default_device(device),
        dtype=dtype,
        progress=progress,
        utility=utility,
    )


def evaluate_with(model: str | Path, against: str | Path | None, opts: Any, runtime: Any = None):
    """``evaluate`` with its options as an ``evaluate.EvalOptions`` (what the CLI builds)."""
    from . import evaluate as ev
    from .organisms.exact import load_exact_judge

    unknown = [s for s in opts.settings if s not in ev.SETTINGS]
    if unknown:
        raise InputError(f"unknown setting(s) {unknown}; known: {', '.join(ev.SETTINGS)}")
    subject = ev.Subject(_local(model), opts.device, opts.dtype)
    original = ev.Subject(_local(against), opts.device, opts.dtype) if against else None
    opts.exact = load_exact_judge(subject.path) or load_exact_judge(original and original.path)
    systems = {"original": original} if original else {}
    if runtime is not None:
        systems["runtime"] = ev.with_hooks(original or subject, runtime)
    systems["model"] = subject
    # Without ``against``, the runtime guard is compared with the unguarded model it wraps.
    return ev.run_eval(systems, original or (subject if runtime is not None else None), opts)


def verify(folder: str | Path, source: str | Path | None = None, progress: bool = False):
    """Check a guarded folder against its record (and, with ``source``, every tensor against
    the source and the recomputed fold); returns the ``VerifyReport`` (``.ok``)."""
    from .verify import verify as run

    return run(Path(folder), Path(_local(source)) if source else None, progress)


def adapter(
    folder: str | Path, source: str | Path, output: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Write a guarded folder's edit as a PEFT LoRA adapter; returns its adapter_config."""
    from .adapter import write_adapter

    return write_adapter(Path(folder), Path(_local(source)), Path(output), overwrite)


def _local(name: str | Path) -> str:
    from .checkpoint import resolve_model

    return str(resolve_model(str(name)).path)
