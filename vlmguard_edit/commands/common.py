"""What the commands share: common options, progress, recipe building from options."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from ..kinds import option_help


def quiet_option(func):
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars.")(func)


def progress(quiet: bool) -> bool:
    """Our progress bars only on a terminal and without -q (before or after the command);
    when they are off, so are transformers' and huggingface_hub's (loading, downloads)."""
    context = click.get_current_context(silent=True)
    quiet = quiet or bool(context and (context.find_root().obj or {}).get("quiet"))
    show = not quiet and sys.stderr.isatty()
    if not show:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are imported
        if "transformers" in sys.modules:  # already imported (e.g. in-process callers)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # also huggingface_hub's
        elif "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    return show


def direction_options(func):
    """Options shared by `convert` and `direction` (they override the recipe)."""
    options = [
        click.option(
            "--recipe", type=click.Path(dir_okay=False), help="Recipe YAML (see recipes/)."
        ),
        click.option(
            "--layers",
            help="Layers to edit, e.g. '16-31' or '10,11,20'. Default: the kind's own (every "
            "text layer for the learned kinds, the upper half for a direction).",
        ),
        click.option(
            "--rank",
            type=click.IntRange(min=1),
            help="Rank of the learned B A or of a direction. Default, by kind: "
            + option_help("rank"),
        ),
        click.option(
            "--anchors", help="'default' or a JSONL/CSV file with harmful,harmless columns."
        ),
        click.option(
            "--template", help="Prompt template with {request}, for LLMs without a chat template."
        ),
        click.option("--base-revision", help="Hub revision of the base LLM."),
        click.option(
            "--batch-size", type=click.IntRange(min=1), help="Anchor prompts per forward pass."
        ),
        click.option(
            "--device",
            help="Device for the base LLM forward passes (default: cuda if available); 'auto' "
            "spreads a model too large for one device with accelerate's device_map.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="Dtype for the base LLM (auto: float32 on CPU, the checkpoint's dtype on GPU).",
        ),
        click.option(
            "--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) base LLM weights."
        ),
        click.option(
            "--trust-remote-code", is_flag=True, help="Allow custom model code from the repo."
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
    ]
    return _stacked(options)(func)


# learned_options' recipe keys that convert and calibrate pass through as they are.
LEARNED_KEYS = ("preservation_weight", "recombine", "adversarial")


def learned_options(prefix: str):
    """The learned kinds' options shared by `convert` (``prefix`` says so) and `calibrate`."""
    options = [
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            help=f"{prefix}Passes over the data; replaces the recipe's search (calibration "
            "candidates, by kind: " + option_help("search") + ").",
        ),
        click.option(
            "--learning-rate",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            help=f"{prefix}Adam learning rate (default 1e-3).",
        ),
        click.option(
            "--images",
            help=f"{prefix}Training images, from blank,noise,scene,typographic (typographic: the "
            "anchor rendered into the image, taught only to a model that reads it). Default, "
            "by kind: " + option_help("images"),
        ),
        click.option(
            "--preserve-images",
            help=f"{prefix}Images on which only the harmless anchors are taught (to keep the "
            "original's answers), e.g. typographic for a model that may not read.",
        ),
        click.option(
            "--preservation-weight",
            type=click.FloatRange(0, min_open=True),
            help=f"{prefix}Loss weight of the preservation rows against the refusal rows. "
            "Default, by kind: " + option_help("preservation_weight"),
        ),
        click.option(
            "--recombine",
            type=click.IntRange(min=0),
            help=f"{prefix}Also teach N recombined anchor pairs (one pair's changed words in "
            "another's sentence) on typographic renders (default 0).",
        ),
        click.option(
            "--adversarial",
            callback=_adversarial,
            metavar="EPS:STEPS|off",
            help=f"{prefix}Also train on images crafted against the edit as it learns: PGD on "
            "a blank image's pixels, L-inf EPS/255, STEPS more steps each epoch (e.g. 64:10); "
            "off: none (default: off).",
        ),
    ]
    return _stacked(options)


def _adversarial(ctx, param, value: str | None):
    """'64:10' -> {eps: 64, steps: 10}; 'off' -> OFF (no adversarial rows); None: not given."""
    if value is None:
        return None
    if value == "off":
        return OFF
    try:
        eps, steps = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use EPS:STEPS or off", param=param) from None
    if not 1 <= eps <= 255 or steps < 1:
        raise click.BadParameter(f"{value!r}: 1 <= EPS <= 255, STEPS >= 1", param=param)
    return {"eps": eps, "steps": steps}


OFF = "off"  # an option given as off: the recipe's value becomes None


def _stacked(options: list):
    """One decorator applying ``options`` in the order listed."""

    def apply(func):
        for option in reversed(options):
            func = option(func)
        return func

    return apply


def push_folder(folder: Path, repo_id: str, private: bool, revision, commit_message) -> None:
    from vlmguard_edit.hub import push as run_push

    result = run_push(folder, repo_id, private, revision, commit_message)
    if result.changed:
        click.echo(f"pushed {folder} to {result.repo_id}@{result.revision}: {result.commit_url}")
    else:
        click.echo(f"{result.repo_id}@{result.revision} already has every file: nothing pushed")


def build_recipe(kw: dict, base_llm: str | None, default: bool = True, **extra):
    """Recipe values, overridden by the command-line options that were given; without a
    recipe file, the default edit's (``default``) or the plain values."""
    from vlmguard_edit.recipes import (
        BaseLLM,
        Recipe,
        base_recipe,
        load_recipe,
        parse_layers,
        training_length,
    )

    recipe_path = kw.pop("recipe")
    if recipe_path:
        recipe = load_recipe(recipe_path)
    else:
        recipe = base_recipe(extra.get("mode")) if default else Recipe()
    layers = kw.pop("layers")
    if layers is not None:
        try:
            layers = parse_layers(layers)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--layers") from exc
    base = recipe.base_llm
    if base_llm is not None and base_llm != base.id:
        base = BaseLLM(id=base_llm)  # another base LLM does not inherit the recipe's template
    template, revision = kw.pop("template"), kw.pop("base_revision")
    if template is not None:
        if "{request}" not in template:
            raise click.BadParameter(
                "must contain the placeholder {request}", param_hint="--template"
            )
        base = dataclasses.replace(base, template=template)
    if revision is not None:
        base = dataclasses.replace(base, revision=revision)
    changes = {
        "layers": layers,
        "rank": kw.pop("rank"),
        "anchors": kw.pop("anchors"),
        "batch_size": kw.pop("batch_size"),
        **extra,
    }
    given = {k: v for k, v in training_length(changes).items() if v is not None}
    return dataclasses.replace(
        recipe, base_llm=base, **{k: None if v == OFF else v for k, v in given.items()}
    )


def hub_id(value: str | None, option: str) -> str | None:
    from vlmguard_edit.checkpoint import is_hub_id

    if value is not None and not is_hub_id(value):
        raise click.BadParameter(f"{value!r} is not a Hub id like org/name", param_hint=option)
    return value


def image_kinds(images: str | None, option: str = "--images") -> list[str] | None:
    from vlmguard_edit.recipes import IMAGE_KINDS

    if images is None:
        return None
    kinds = [k.strip() for k in images.split(",") if k.strip()]
    bad = [k for k in kinds if k not in IMAGE_KINDS]
    if bad or not kinds:
        raise click.BadParameter(f"use some of {','.join(IMAGE_KINDS)}", param_hint=option)
    return kinds


def search_candidates(search: str | None) -> list[dict] | None:
    """'40:1e-3,80:3e-3' -> [{epochs: 40, learning_rate: 0.001}, ...]."""
    if search is None:
        return None
    out = []
    for item in search.split(","):
        try:
            epochs, rate = item.split(":")
            out.append({"epochs": int(epochs), "learning_rate": float(rate)})
        except ValueError:
            raise click.BadParameter(f"{item!r}: use EPOCHS:RATE", param_hint="--search") from None
        if out[-1]["epochs"] < 1 or not 0 < out[-1]["learning_rate"] < 1:
            raise click.BadParameter(f"{item!r}: epochs >= 1, 0 < rate < 1", param_hint="--search")
    return out


def layer_span(layers: list[int]) -> str:
    """'layer 3', 'layers 16-31' or 'layers 2,5' ('the image path' for none)."""
    from vlmguard_edit.layout import span

    if not layers:
        return "the image path"

    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {span(layers)}"


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
