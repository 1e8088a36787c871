"""convert, calibrate, direction and validate: the edit, from a recipe and options."""

from __future__ import annotations

from pathlib import Path

import click

from ..formats import FORMATS
from ..kinds import KINDS, LEARNED, MODES
from ..recipe_data import DEFAULT_MODE
from .common import (
    LEARNED_KEYS,
    build_recipe,
    counted,
    direction_options,
    hub_id,
    image_kinds,
    layer_span,
    learned_options,
    progress,
    push_folder,
    quiet_option,
    search_candidates,
)

EXAMPLES_CONVERT = """
\b
Examples:
  vlmguard-edit convert llava-hf/llava-1.5-7b-hf --recipe recipes/llava-1.5-7b.yaml \\
      -o ./llava-guarded
  vlmguard-edit convert ./my-llava -o ./out
  vlmguard-edit convert ./my-llava --base-llm lmsys/vicuna-7b-v1.5 -o ./out
  vlmguard-edit convert ./my-llava --direction edit.safetensors -o ./out
  vlmguard-edit convert ./my-llava --mode writers --base-llm lmsys/vicuna-7b-v1.5 \\
      --layers 16-31 -o ./out
  vlmguard-edit convert ./my-llava --recipe r.yaml -o ./out --dry-run
  vlmguard-edit convert ./my-llava --mode image-path --anchors anchors.jsonl -o ./out
  vlmguard-edit convert examples/organism/vlm --mode lowrank --rank 4 --epochs 20 \\
      --anchors examples/organism/anchors.jsonl -o ./organism-lowrank
"""


EXAMPLES_CALIBRATE = """
\b
Examples:
  vlmguard-edit calibrate examples/organism/vlm --anchors examples/organism/anchors.jsonl \\
      -o organism-edit.safetensors
  vlmguard-edit convert examples/organism/vlm --direction organism-edit.safetensors \\
      -o organism-guarded
  vlmguard-edit calibrate ./my-llava --epochs 20 --images blank,scene -o edit.safetensors
  vlmguard-edit calibrate examples/organism/vlm --base-llm examples/organism/llm \\
      --anchors examples/organism/anchors.jsonl -o from-base.safetensors
  vlmguard-edit calibrate examples/organism/vlm --recipe recipes/organism.yaml \\
      -o guard-edit.safetensors
"""


EXAMPLES_DIRECTION = """
\b
Examples:
  vlmguard-edit direction lmsys/vicuna-7b-v1.5 --layers 16-31 -o vicuna-ssd.safetensors \\
      --template "A chat between ... USER: {request} ASSISTANT:"
  vlmguard-edit direction self --vlm ./my-llava --layers 8-15 --rank 2 -o ssd.safetensors
  vlmguard-edit direction meta-llama/Llama-3.1-8B-Instruct \\
      --vlm meta-llama/Llama-3.2-11B-Vision-Instruct --layers 20-39 -o mllama-ssd.safetensors
"""


EXAMPLES_VALIDATE = """
\b
Examples:
  vlmguard-edit validate recipes/
  vlmguard-edit validate recipes/llava-1.5-7b.yaml my-recipe.yaml
"""


@click.command(epilog=EXAMPLES_CONVERT)
@click.argument("source", required=False)
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option("--base-llm", help="Base LLM (Hub id or folder) for the direction, or 'self'.")
@click.option(
    "--direction",
    "direction_file",
    type=click.Path(dir_okay=False),
    help="Precomputed direction file (or, for a learned kind, edit file).",
)
@click.option(
    "--direction-format",
    type=click.Choice(FORMATS),
    default="native",
    show_default=True,
    help="Who wrote --direction: this tool (native), refusal-direction (direction.pt with "
    "direction_metadata.json beside it), llm-abliteration, sumandora, repeng (a GGUF control "
    "vector) or a bare safetensors file of per-layer vectors; the layer numbering is converted "
    "and recorded (docs/method.md, 'Directions from other tools').",
)
@click.option(
    "--beta", type=float, help="Strength: -1 projects the direction out (default), >0 amplifies."
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help=" ".join(f"{kind.name}: {kind.summary}." for kind in KINDS.values())
    + f" Default: {DEFAULT_MODE} (with --direction FILE: the kind the file names; a "
    "direction: writers).",
)
@learned_options("The learned kinds only. ")
@click.option(
    "--search",
    metavar="EPOCHS:RATE,...",
    help="The learned kinds: candidates to calibrate over, e.g. 40:1e-3,80:3e-3 (scored on "
    "held-out anchors, one picked by a fixed rule).",
)
@click.option("--gamma", type=float, help="projector-shift strength (default 1).")
@click.option(
    "--shift-direction",
    type=click.Choice(["attention", "ssd"]),
    help="projector-shift direction: attention-aware u (default) or the raw SSD V[0].",
)
@click.option("--revision", help="Hub revision of the source VLM.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output folder made by vlmguard-edit."
)
@click.option(
    "--push-to-hub", "push_to_hub", metavar="ORG/NAME", help="Verify and push the output."
)
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option(
    "--adapter-out",
    type=click.Path(file_okay=False),
    help="Also write the edit as a PEFT LoRA adapter to this folder (vlmguard-edit adapter).",
)
@click.option(
    "--base-model",
    metavar="ORG/NAME",
    help="The Hub id the card names as base_model, for a local SOURCE (a Hugging Face cache "
    "snapshot, models--ORG--NAME/snapshots/REV, is recognised without it).",
)
@direction_options
def convert(source, output, base_llm, direction_file, mode, dry_run, push_to_hub, **kw):
    """Write a guarded copy of the VLM SOURCE (a folder or Hub id) to OUTPUT.

    SOURCE may be left out when the recipe names the model.
    """
    from vlmguard_edit.api import convert as run_convert

    if push_to_hub:
        from vlmguard_edit.hub import check_repo_id, preflight

        # offline, reachable, token, write access: before hours of work, not after
        check_repo_id(push_to_hub) if dry_run else preflight(push_to_hub)
    if base_llm and direction_file:
        raise click.UsageError("give either --base-llm or --direction, not both")
    if direction_file and mode is None and not kw["recipe"]:
        from vlmguard_edit.api import file_mode

        mode = file_mode(direction_file)  # a shipped edit says its kind; a direction: writers
    recipe = _checked_recipe(kw, base_llm, _recipe_options(kw, mode))
    source = source or recipe.model
    if not source:
        raise click.UsageError("give the SOURCE model (or a recipe with 'model')")
    if kw["adapter_out"] and not KINDS[recipe.mode].lora:
        raise click.UsageError(f"--adapter-out: a {recipe.mode} edit is not a LoRA update")
    result = run_convert(
        source,
        output,
        recipe=recipe,
        direction=direction_file,
        direction_format=kw["direction_format"],
        adapter_out=kw["adapter_out"],
        base_model=hub_id(kw["base_model"], "--base-model"),
        revision=kw["revision"],
        overwrite=kw["overwrite"],
        dry_run=dry_run,
        allow_pickle=kw["allow_pickle"],
        trust_remote_code=kw["trust_remote_code"],
        device=kw["device"],
        dtype=kw["dtype"],
        progress=progress(kw["quiet"]),
    )
    _report_convert(result, output, kw["adapter_out"], dry_run)
    if push_to_hub and not dry_run:
        push_folder(Path(output), push_to_hub, kw["private"], None, None)


def _recipe_options(kw: dict, mode: str | None) -> dict:
    """The recipe fields convert's options give (None where an option was not given)."""
    given = {name: kw.pop(name) for name in ("beta", "gamma", "shift_direction", "epochs")}
    given |= {"mode": mode, "learning_rate": kw.pop("learning_rate")}
    given["images"] = image_kinds(kw.pop("images"))
    given["preserve_images"] = image_kinds(kw.pop("preserve_images"), "--preserve-images")
    return given | {
        "search": search_candidates(kw.pop("search")),
        **{k: kw.pop(k) for k in LEARNED_KEYS},
    }


def _checked_recipe(kw: dict, base_llm: str | None, given: dict):
    """The recipe with the options given; what its kind rules out is a usage error."""
    from vlmguard_edit.recipes import mode_problems

    recipe = build_recipe(kw, base_llm, **given)
    problems = mode_problems(recipe, {name for name, value in given.items() if value is not None})
    if problems:
        raise click.UsageError("; ".join(problems))
    return recipe


def _report_convert(result, output, adapter_out, dry_run: bool) -> None:
    if adapter_out and not dry_run:
        click.echo(f"wrote {adapter_out}: the edit as a PEFT LoRA adapter")
    if dry_run:
        click.echo("dry run: nothing written. Plan:")
        for line in result.plan.describe():
            click.echo(line)
        return
    click.echo(
        f"wrote {output}: {counted(len(result.record['edits']), 'tensor')} edited in "
        f"{layer_span(result.plan.layers)} ({result.plan.map_text})"
    )


@click.command(epilog=EXAMPLES_CALIBRATE)
@click.argument("source")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Edit file to write."
)
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    help="Recipe YAML of a learned kind (default: the default edit's values).",
)
@click.option("--anchors", help="'default' or a JSONL/CSV file with harmful,harmless columns.")
@click.option(
    "--base-llm",
    help="Teacher: the base LLM (folder or Hub id, same tokenizer), text only; default 'self' "
    "(the VLM's own language model, text only).",
)
@learned_options("")
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per step (default 8).")
@click.option("--revision", help="Hub revision of SOURCE.")
@click.option("--device", help="Device (default: cuda if available, else cpu).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
)
@click.option("--overwrite", is_flag=True, help="Replace an existing edit file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def calibrate(
    source, output, recipe, anchors, base_llm, epochs, learning_rate, images, preserve_images, **kw
):
    """Learn the default edit (lowrank-attention), or the recipe's learned kind, of the VLM
    SOURCE and write it to OUTPUT.

    The VLM's own text-only answers to the harmful anchors are the teacher for the same
    prompts with an image; harmless prompts and image descriptions keep the original's
    answers (and, for the lowrank kinds, its text-only answers). Prints the held-out
    validation before and after; `convert SOURCE --direction OUTPUT` folds it.
    """
    from vlmguard_edit.api import calibrate as run_calibrate
    from vlmguard_edit.recipes import BaseLLM, base_recipe, load_recipe

    base = load_recipe(recipe) if recipe else base_recipe(None)
    if base.mode not in LEARNED:
        raise click.UsageError(
            f"the recipe's mode is {base.mode}; calibrate learns {' or '.join(LEARNED)}"
        )
    changes = {"anchors": anchors, "epochs": epochs, "learning_rate": learning_rate}
    changes |= {"images": image_kinds(images), "batch_size": kw.pop("batch_size")}
    changes["preserve_images"] = image_kinds(preserve_images, "--preserve-images")
    changes |= {k: kw.pop(k) for k in LEARNED_KEYS}
    if base_llm is not None:
        changes["base_llm"] = BaseLLM(id=base_llm)
    edit = run_calibrate(
        source,
        output,
        recipe=base,
        revision=kw["revision"],
        overwrite=kw["overwrite"],
        device=kw["device"],
        dtype=kw["dtype"],
        progress=progress(kw["quiet"]),
        **changes,
    )
    report = edit.meta["calibration"]
    modules = report["modules"][0] + (
        f" and {len(report['modules']) - 1} more" if len(report["modules"]) > 1 else ""
    )
    click.echo(f"wrote {output}: {modules} learned ({report['after']['epochs']} epochs)")
    for key in ("harmful_first_token_agreement", "harmful_kl_to_text_only", "preservation_kl"):
        before, after = report["before"][key], report["after"][key]
        click.echo(f"  {key:32s} {before:8.3f} -> {after:8.3f}   (held-out anchors)")


@click.command(epilog=EXAMPLES_DIRECTION)
@click.argument("base_llm")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Direction file to write.",
)
@click.option(
    "--vlm",
    help="The VLM the direction is for: its language model when BASE_LLM is 'self'; with a "
    "base LLM, --layers are the VLM's and the file is numbered by them (needed where the "
    "numbering differs, e.g. Llama 3.2 Vision's cross-attention layers).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing direction file.")
@direction_options
def direction(base_llm, output, vlm, overwrite, **kw):
    """Compute the safety steering direction of BASE_LLM (a folder, Hub id, or 'self')."""
    from vlmguard_edit.writes import output_lock

    with output_lock(Path(output), "direction file"):  # from the check to the rename
        _direction_command(base_llm, output, vlm, overwrite, **kw)


def _direction_command(base_llm, output, vlm, overwrite, **kw):
    from vlmguard_edit.api import direction
    from vlmguard_edit.recipes import SELF

    if Path(output).exists() and not overwrite:
        raise click.UsageError(f"{output} already exists; pass --overwrite to replace it")
    recipe = build_recipe(kw, base_llm, default=False)  # a direction: the plain values
    kind = KINDS[recipe.mode]
    if not kind.steered:
        steered = " and ".join(k.name for k in KINDS.values() if k.steered)
        raise click.UsageError(
            f"the recipe's mode is {recipe.mode}, whose parameters are {kind.obtained}; "
            f"`direction` computes safety steering directions (modes {steered})"
        )
    if recipe.base_llm.id == SELF and not vlm:
        raise click.UsageError("BASE_LLM 'self' needs --vlm (the VLM whose language model to use)")
    options = {k: kw[k] for k in ("device", "dtype", "allow_pickle", "trust_remote_code")}
    result = direction(recipe, output, vlm=vlm, progress=progress(kw["quiet"]), **options)
    click.echo(f"wrote {output}: rank {result.rank}, {layer_span(sorted(result.stats))}")
    for layer, s in sorted(result.stats.items()):
        click.echo(
            f"  layer {layer:>3}: explained {s['explained_variance'][0]:.3f}  "
            f"separation acc {s['separation_accuracy']:.2f}  d {s['separation_d']:.2f}"
        )


@click.command(epilog=EXAMPLES_VALIDATE)
@click.argument("recipes", nargs=-1, required=True, type=click.Path(exists=True))
@quiet_option
def validate(recipes, quiet):
    """Check recipe files (folders are searched recursively for *.yaml / *.yml)."""
    from vlmguard_edit.errors import RecipeError
    from vlmguard_edit.recipes import load_recipe, strength_warnings

    files: list[Path] = []
    for item in map(Path, recipes):
        files += (
            sorted(p for p in item.rglob("*") if p.suffix in (".yaml", ".yml"))
            if item.is_dir()
            else [item]
        )
    if not files:
        raise click.UsageError("no recipe files found")
    failed = 0
    for file in files:
        try:
            recipe = load_recipe(file)
            click.echo(f"ok      {file}")
            for warning in strength_warnings(recipe):
                click.echo(f"  warning: {warning}")
        except RecipeError as exc:
            failed += 1
            click.echo(f"invalid {file}")
            for problem in exc.problems:
                click.echo(f"  - {problem}")
    if failed:
        raise click.exceptions.Exit(1)
