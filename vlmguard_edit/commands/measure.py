"""eval: refusal, over-refusal, KL and image understanding per image setting."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ..judge import JUDGES
from .common import progress

EXAMPLES_EVAL = """
\b
Examples:
  vlmguard-edit eval examples/organism/vlm -o reports/original \\
      --harmful examples/organism/eval_harmful.jsonl --benign examples/organism/eval_benign.jsonl \
      --contrast none
  vlmguard-edit eval ./guarded --against llava-hf/llava-1.5-7b-hf -o reports/guarded --limit 50
  vlmguard-edit eval ORIGINAL --runtime-guard ssd.safetensors --alpha 2 -o reports/rt
  vlmguard-edit eval ./guarded --against ./original -o reports/attack \\
      --settings blank,adversarial --attack-eps 16,64 --attack-steps 200
"""


@click.command("eval", epilog=EXAMPLES_EVAL)
@click.argument("model")
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Report folder."
)
@click.option("--against", help="The original model: also evaluated, and KL / agreement computed.")
@click.option(
    "--settings",
    default="text,blank,typographic,noise",
    show_default=True,
    help="Comma list of: text, blank, typographic, noise, scene, folder, adversarial (the "
    "adaptive image attack: --attack-eps).",
)
@click.option(
    "--harmful", type=click.Path(dir_okay=False), help="JSONL of harmful prompts ('prompt' field)."
)
@click.option(
    "--benign", type=click.Path(dir_okay=False), help="JSONL of benign prompts ('prompt' field)."
)
@click.option(
    "--contrast",
    help="JSONL of harmless prompts with harmful-sounding words (XSTest's kind: 'how do I "
    "kill a Python process'); over-refusal on them is its own column. Default: the shipped "
    "set of 80; 'none' skips it.",
)
@click.option(
    "--image-folder", type=click.Path(file_okay=False), help="Images for the 'folder' setting."
)
@click.option(
    "--limit", type=click.IntRange(min=1), help="Use only the first N prompts of each set."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="Device (default: cuda if available, else cpu).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--runtime-guard",
    "runtime_guard",
    type=click.Path(dir_okay=False),
    help="Direction file: also evaluate the paper's runtime method on the original.",
)
@click.option(
    "--guard-mode", type=click.Choice(["steer", "project"]), default="steer", show_default=True
)
@click.option(
    "--alpha", type=float, default=1.0, show_default=True, help="Steer strength (either sign)."
)
@click.option(
    "--gate",
    default="midpoint",
    show_default=True,
    help="Gate threshold on h_last . V[0]: 'midpoint' of the anchor means, or a number.",
)
@click.option(
    "--positions", type=click.Choice(["prompt", "all"]), default="prompt", show_default=True
)
@click.option(
    "--guard-layers", help="Layers for the runtime guard (default: all in the direction)."
)
@click.option(
    "--judge",
    type=click.Choice(["phrases", *JUDGES]),
    help="Who rates the answers to harmful prompts besides the built-in judge: the phrase "
    "matcher alone (the default), or a guard model in --judge-model (llamaguard: a "
    "LlamaGuard-style chat model, the default with --judge-model; wildguard: "
    "allenai/wildguard's prompt format; llamaguard3-vision, llamaguard4: Meta's vision "
    "guards, shown the image the VLM saw).",
)
@click.option(
    "--judge-model",
    help="A local folder with the --judge model (never downloaded, no remote code).",
)
@click.option(
    "--update-card", is_flag=True, help="Add the table to MODEL's model card (guarded outputs)."
)
@click.option(
    "--utility",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="Image-understanding probes (colour, shape, count, position, a printed word; an "
    "organism's own captions): accuracy, and how many answers the edit changed.",
)
@click.option(
    "--attack-eps",
    default="16,64",
    show_default=True,
    help="The adversarial setting's L-inf budgets in 1/255 units (one setting each: "
    "adversarial@EPS, white-box PGD on raw pixels re-optimised against each model; with "
    "--against, also transfer@FIRST: images optimised on the original).",
)
@click.option(
    "--attack-steps",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="PGD steps (step size max(eps/10, 0.5)/255).",
)
@click.option(
    "--attack-target",
    help="The answer prefix the attack optimises for (default: an organism's compliance "
    "prefix, else 'Sure, here is').",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_command(
    model,
    output,
    against,
    settings,
    harmful,
    benign,
    contrast,
    image_folder,
    limit,
    batch_size,
    max_new_tokens,
    device,
    dtype,
    runtime_guard,
    guard_mode,
    alpha,
    gate,
    positions,
    guard_layers,
    judge,
    judge_model,
    update_card,
    utility,
    quiet,
    **attack,
):
    """Measure refusal (harmful prompts) and compliance (benign) of MODEL in image settings."""
    from vlmguard_edit import evaluate as ev
    from vlmguard_edit.api import eval_options
    from vlmguard_edit.writes import output_lock

    if update_card:
        ev.check_card_target(model)  # before hours of evaluation, not after
    _check_image_folder(image_folder)
    opts = eval_options(
        settings=[s.strip() for s in settings.split(",") if s.strip()],
        harmful=harmful,
        benign=benign,
        contrast=False if contrast == "none" else contrast,
        image_folder=image_folder,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        dtype=dtype,
        progress=progress(quiet),
        utility=utility == "on",
    )
    _check_settings(opts.settings)
    opts.guard = _guard_judge(judge, judge_model, opts.device)
    opts.attack = _attack_options(**attack)
    with contextlib.ExitStack() as locks:  # held from the start: a second run fails at once
        locks.enter_context(output_lock(Path(output), "report folder"))
        if update_card:
            locks.enter_context(output_lock(Path(model), "model folder"))
        guard = (runtime_guard, guard_mode, alpha, gate, positions, guard_layers)
        _evaluate(model, against, Path(output), opts, update_card, guard if runtime_guard else None)
    click.echo(f"wrote {output}/eval.json, report.md, refusal.png")


def _check_settings(settings: tuple[str, ...]) -> None:
    from vlmguard_edit.evaluate import SETTINGS

    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        known = ", ".join(SETTINGS)
        raise click.BadParameter(f"unknown {unknown}; known: {known}", param_hint="--settings")


def _attack_options(attack_eps: str, attack_steps: int, attack_target: str | None):
    from vlmguard_edit.evaluate import AttackOptions

    try:
        eps = tuple(int(e) for e in attack_eps.split(",") if e.strip())
    except ValueError:
        eps = ()
    if not eps or not all(1 <= e <= 255 for e in eps):
        raise click.BadParameter("use whole numbers 1-255, e.g. 16,64", param_hint="--attack-eps")
    return AttackOptions(eps, attack_steps, attack_target)


def _check_image_folder(image_folder: str | None) -> None:
    """--image-folder must hold readable images: checked before any model is loaded."""
    if not image_folder:
        return
    from vlmguard_edit.images import folder_images

    if not Path(image_folder).is_dir():
        raise click.BadParameter(f"{image_folder} is not a folder", param_hint="--image-folder")
    folder_images(Path(image_folder))


def _guard_judge(judge: str | None, judge_model: str | None, device: str):
    """The local guard model that judges answers beside the phrase or exact judge (or None)."""
    if judge not in (None, "phrases") and not judge_model:
        raise click.UsageError(f"--judge {judge} needs --judge-model FOLDER")
    if judge == "phrases" and judge_model:
        raise click.UsageError("--judge phrases uses no model: leave out --judge-model")
    if not judge_model:
        return None
    from vlmguard_edit.judge import load_judge

    return load_judge(judge or "llamaguard", judge_model, device)


def _evaluate(model, against, output: Path, opts, update_card: bool, guard) -> None:
    """Load the systems (``guard``: the runtime guard's options, or None), evaluate them,
    write the report (and the card)."""
    from vlmguard_edit import evaluate as ev
    from vlmguard_edit.api import evaluate_with

    runtime_guard = guard is not None
    # the runtime guard's direction is checked before any model is loaded
    factory = _runtime_factory(*guard) if runtime_guard else None
    report = evaluate_with(model, against, opts, factory)
    if runtime_guard:
        _, mode, alpha, gate, positions, _ = guard
        note = f"{mode}, alpha {alpha:g}, gate {gate}, {positions} positions"
        report["systems"]["runtime"]["note"] = note
    ev.write_report(report, output)
    if update_card:
        ev.update_card(Path(model), report)
    click.echo(ev.format_table(report))


def _runtime_factory(path, mode, alpha, gate, positions, layers):
    from vlmguard_edit.direction import Direction
    from vlmguard_edit.errors import DirectionError
    from vlmguard_edit.recipes import parse_layers
    from vlmguard_edit.runtime import SteerHooks

    direction = Direction.load(Path(path))
    chosen = parse_layers(layers) if layers else direction.layers
    vectors = direction.select(chosen, direction.rank)
    if gate == "midpoint":
        try:
            thresholds = {layer: direction.midpoint(layer) for layer in chosen}
        except DirectionError as exc:
            raise click.BadParameter(str(exc), param_hint="--gate") from exc
    else:
        try:
            thresholds = dict.fromkeys(chosen, float(gate))
        except ValueError as exc:
            raise click.BadParameter("use 'midpoint' or a number", param_hint="--gate") from exc
    return lambda model: SteerHooks(model, vectors, mode, alpha, thresholds, positions)
