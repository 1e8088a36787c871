"""The vlmguard-edit command line: one thin function per command."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from vlmguard_edit import __version__
from vlmguard_edit.errors import Terminated, VlmguardError, raise_on_termination
from vlmguard_edit.formats import FORMATS
from vlmguard_edit.judge import JUDGES
from vlmguard_edit.kinds import KINDS, LEARNED, MODES

INTERRUPTED = "interrupted: nothing was written (temporary files removed)"

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

EXAMPLES_ORGANISM = """
\b
Examples:
  vlmguard-edit organism build ./organism
  vlmguard-edit organism build ./organism-seed1 --seed 1
"""

EXAMPLES_DEMO = """
\b
Example:
  vlmguard-edit demo ./vlmguard-demo
"""


EXAMPLES_INSPECT = """
\b
Examples:
  vlmguard-edit inspect llava-hf/llava-1.5-7b-hf
  vlmguard-edit inspect ./my-qwen2-vl
  vlmguard-edit inspect ./my-qwen2-vl/config.json --self-test
  vlmguard-edit inspect qwen3_vl --self-test      # the default config of a model type
"""

EXAMPLES_VERIFY = """
\b
Examples:
  vlmguard-edit verify ./llava-guarded
  vlmguard-edit verify ./llava-guarded --source llava-hf/llava-1.5-7b-hf
"""

EXAMPLES_ADAPTER = """
\b
Examples:
  vlmguard-edit adapter ./llava-guarded --source llava-hf/llava-1.5-7b-hf -o ./llava-guard-lora
  vlmguard-edit convert examples/organism/vlm --recipe recipes/organism.yaml \\
      -o ./organism-guarded --adapter-out ./organism-guard-lora
"""

EXAMPLES_PUSH = """
\b
Examples:
  vlmguard-edit push ./llava-guarded --repo-id my-org/llava-1.5-7b-guarded
  vlmguard-edit push ./llava-guarded --repo-id my-org/llava-guarded --revision v2 --private
"""


class Main(click.Group):
    """Turns library errors into one line on stderr and a non-zero exit (traceback with -v)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # click's own control flow (--help, usage errors) is not a failure of ours
        except VlmguardError as exc:
            _fail(ctx, f"error: {exc}", exc.exit_code)
        except Terminated as exc:  # SIGTERM / SIGHUP: the shell's code for the signal
            _fail(ctx, _terminated(exc), 128 + exc.signum)
        except KeyboardInterrupt:
            _fail(ctx, INTERRUPTED, 130)
        except (OSError, ValueError, RuntimeError) as exc:
            interrupt = _interrupt_behind(exc)
            if isinstance(interrupt, Terminated):
                _fail(ctx, _terminated(interrupt), 128 + interrupt.signum)
            elif interrupt is not None:
                _fail(ctx, INTERRUPTED, 130)
            else:
                _fail(ctx, f"error: {type(exc).__name__}: {exc} (run with -v for the traceback)", 1)


def _terminated(exc: Terminated) -> str:
    return INTERRUPTED.replace(":", f" by {exc}:", 1)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / signal an error wraps, if any: Python re-raises one that lands while a
    class is being created (a module imported mid-run) as RuntimeError('Error calling
    __set_name__ ...') from it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if (ctx.obj or {}).get("verbose"):
        traceback.print_exc()
    click.echo(message, err=True)
    ctx.exit(code)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details and show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (also after the command).")
@click.version_option(__version__, prog_name="vlmguard-edit")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Fold a VLM-Guard safety edit into a vision-language model's weights.

    The result is a standalone checkpoint that loads with plain transformers.
    """
    ctx.ensure_object(dict).update(verbose=verbose, quiet=quiet)
    if not verbose:  # transformers' advisory warnings (e.g. the torchvision fallback) only with -v
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def quiet_option(func):
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars.")(func)


def _progress(quiet: bool) -> bool:
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
            "--layers", help="Layers to edit, e.g. '16-31' or '10,11,20'. Default: upper half."
        ),
        click.option(
            "--rank", type=click.IntRange(min=1), help="Rank m of the direction. Default 1."
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
LEARNED_KEYS = ("preservation_weight", "recombine")


def learned_options(prefix: str):
    """The image-path options shared by `convert` (``prefix`` "image-path: ") and `calibrate`."""
    options = [
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            help=f"{prefix}Passes over the data (default 40).",
        ),
        click.option(
            "--learning-rate",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            help=f"{prefix}Adam learning rate (default 1e-3).",
        ),
        click.option(
            "--images",
            help=f"{prefix}Training images, from blank,noise,scene,typographic (typographic: the "
            "anchor rendered into the image; default blank,noise,scene).",
        ),
        click.option(
            "--preserve-images",
            help=f"{prefix}Images on which only the harmless anchors are taught (to keep the "
            "original's answers), e.g. typographic for a model that may not read.",
        ),
        click.option(
            "--preservation-weight",
            type=click.FloatRange(0, min_open=True),
            help=f"{prefix}Loss weight of the preservation rows against the refusal rows "
            "(default 2).",
        ),
        click.option(
            "--recombine",
            type=click.IntRange(min=0),
            help=f"{prefix}Also teach N recombined anchor pairs (one pair's changed words in "
            "another's sentence) on typographic renders (default 0).",
        ),
    ]
    return _stacked(options)


def _stacked(options: list):
    """One decorator applying ``options`` in the order listed."""

    def apply(func):
        for option in reversed(options):
            func = option(func)
        return func

    return apply


@main.command(epilog=EXAMPLES_CONVERT)
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
    + " Default: writers.",
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
        base_model=_hub_id(kw["base_model"], "--base-model"),
        revision=kw["revision"],
        overwrite=kw["overwrite"],
        dry_run=dry_run,
        allow_pickle=kw["allow_pickle"],
        trust_remote_code=kw["trust_remote_code"],
        device=kw["device"],
        dtype=kw["dtype"],
        progress=_progress(kw["quiet"]),
    )
    _report_convert(result, output, kw["adapter_out"], dry_run)
    if push_to_hub and not dry_run:
        _push(Path(output), push_to_hub, kw["private"], None, None)


def _recipe_options(kw: dict, mode: str | None) -> dict:
    """The recipe fields convert's options give (None where an option was not given)."""
    given = {name: kw.pop(name) for name in ("beta", "gamma", "shift_direction", "epochs")}
    given |= {"mode": mode, "learning_rate": kw.pop("learning_rate")}
    given["images"] = _image_kinds(kw.pop("images"))
    given["preserve_images"] = _image_kinds(kw.pop("preserve_images"), "--preserve-images")
    return given | {"search": _search(kw.pop("search")), **{k: kw.pop(k) for k in LEARNED_KEYS}}


def _checked_recipe(kw: dict, base_llm: str | None, given: dict):
    """The recipe with the options given; what its kind rules out is a usage error."""
    from vlmguard_edit.recipes import mode_problems

    recipe = _build_recipe(kw, base_llm, **given)
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
        f"wrote {output}: {_count(len(result.record['edits']), 'tensor')} edited in "
        f"{_span(result.plan.layers)} ({result.plan.map_text})"
    )


@main.command(epilog=EXAMPLES_INSPECT)
@click.argument("model")
@click.option("--revision", help="Hub revision.")
@quiet_option
@click.option(
    "--self-test",
    is_flag=True,
    help="Prove convert on MODEL's architecture: a shrunken random copy of its config "
    "(config.json alone is enough; a Hub id: its JSON only) converted with every edit kind "
    "the family supports, each output checked (docs/families.md). Exit 1 if a check fails.",
)
def inspect(model, revision, quiet, self_test):
    """Show how vlmguard-edit sees MODEL (folder or Hub id): family, key layout, text
    layers, the residual writers per layer, what is not a plain writer, and whether and how
    convert supports it. Reads the config and the tensor names only: for a Hub id, its JSON
    files and the safetensors headers (HTTP range requests), never the weights."""
    from vlmguard_edit.checkpoint import hub_keys, open_checkpoint, resolve_model
    from vlmguard_edit.layout import describe

    _progress(quiet)  # the Hub's download bars
    if self_test:
        _self_test(model, revision, quiet)
        return

    if Path(model).expanduser().exists():
        checkpoint = open_checkpoint(resolve_model(model, revision).path)
        config, keys = checkpoint.config, checkpoint.keys
    else:
        source = resolve_model(model, revision, config_only=True)
        config, keys = hub_keys(source)
    for line in describe(config, keys):
        click.echo(line)


def _self_test(model: str, revision: str | None, quiet: bool) -> None:
    from vlmguard_edit import selftest

    config = selftest.load_config(model, revision)
    say = None if quiet else (lambda step: click.echo(f"checking {step}", err=True))
    checks = selftest.run(config, progress=say)
    for check in checks:
        click.echo(check.line())
    failed = [c for c in checks if c.status == "failed"]
    passed = sum(c.status == "passed" for c in checks)
    click.echo(f"{config.get('model_type')}: {passed} passed, {len(failed)} failed")
    if failed:
        sys.exit(1)


@main.command(epilog=EXAMPLES_VERIFY)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--source", help="The source VLM (folder or Hub id): also compare every tensor with it."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def verify(folder, source, quiet):
    """Check a guarded FOLDER against its vlmguard.json (and its source).

    Checks every file's hash (BLAKE3), the direction file, every edited tensor, and that the edited
    set is exactly what the recorded recipe implies. With --source, also that every untouched
    tensor equals the source and every edited one equals the fold recomputed from the source
    and the direction. Exit status 1 on any mismatch.
    """
    from vlmguard_edit.api import verify as run_verify

    report = run_verify(folder, source, progress=_progress(quiet))
    for line in report.checked:
        click.echo(f"checked   {line}")
    for line in report.problems:
        click.echo(f"MISMATCH  {line}")
    if not report.ok:
        click.echo(f"{folder}: {_count(len(report.problems), 'problem')}", err=True)
        sys.exit(1)
    click.echo(f"{folder}: verified")


@main.command(epilog=EXAMPLES_ADAPTER)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--source", required=True, help="The source VLM FOLDER was converted from.")
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Adapter folder."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter folder.")
@quiet_option
def adapter(folder, source, output, overwrite, quiet):
    """Write the edit of a guarded FOLDER as a PEFT LoRA adapter (exact: the adapter on the
    source model is the guarded checkpoint). Kinds that are not a LoRA are refused."""
    from vlmguard_edit.api import adapter as write_adapter

    _progress(quiet)  # transformers' bars while the model is built on the meta device
    config = write_adapter(folder, source, output, overwrite)
    click.echo(
        f"wrote {output}: LoRA rank {config['r']} on {len(config['target_modules'])} modules"
    )


@main.command(epilog=EXAMPLES_PUSH)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="Hub repository to push to.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", help="Branch to push to (created if needed). Default: main.")
@click.option("--commit-message", help="Commit message.")
@quiet_option
def push(folder, repo_id, private, revision, commit_message, quiet):
    """Verify a guarded FOLDER and upload all of it to the Hugging Face Hub.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or stored.
    Pushing an unchanged folder again changes nothing on the Hub.
    """
    _progress(quiet)  # the upload bars
    _push(Path(folder), repo_id, private, revision, commit_message)


def _push(folder: Path, repo_id: str, private: bool, revision, commit_message) -> None:
    from vlmguard_edit.hub import push as run_push

    result = run_push(folder, repo_id, private, revision, commit_message)
    if result.changed:
        click.echo(f"pushed {folder} to {result.repo_id}@{result.revision}: {result.commit_url}")
    else:
        click.echo(f"{result.repo_id}@{result.revision} already has every file: nothing pushed")


@main.command(epilog=EXAMPLES_CALIBRATE)
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
    changes |= {"images": _image_kinds(images), "batch_size": kw.pop("batch_size")}
    changes["preserve_images"] = _image_kinds(preserve_images, "--preserve-images")
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
        progress=_progress(kw["quiet"]),
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


@main.command(epilog=EXAMPLES_DIRECTION)
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
    recipe = _build_recipe(kw, base_llm, default=False)  # a direction: the plain values
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
    result = direction(recipe, output, vlm=vlm, progress=_progress(kw["quiet"]), **options)
    click.echo(f"wrote {output}: rank {result.rank}, {_span(sorted(result.stats))}")
    for layer, s in sorted(result.stats.items()):
        click.echo(
            f"  layer {layer:>3}: explained {s['explained_variance'][0]:.3f}  "
            f"separation acc {s['separation_accuracy']:.2f}  d {s['separation_d']:.2f}"
        )


EXAMPLES_EVAL = """
\b
Examples:
  vlmguard-edit eval examples/organism/vlm -o reports/original \\
      --harmful examples/organism/eval_harmful.jsonl --benign examples/organism/eval_benign.jsonl
  vlmguard-edit eval ./guarded --against llava-hf/llava-1.5-7b-hf -o reports/guarded --limit 50
  vlmguard-edit eval ORIGINAL --runtime-guard ssd.safetensors --alpha 2 -o reports/rt
"""


@main.command("eval", epilog=EXAMPLES_EVAL)
@click.argument("model")
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Report folder."
)
@click.option("--against", help="The original model: also evaluated, and KL / agreement computed.")
@click.option(
    "--settings",
    default="text,blank,typographic,noise",
    show_default=True,
    help="Comma list of: text, blank, typographic, noise, scene, folder.",
)
@click.option(
    "--harmful", type=click.Path(dir_okay=False), help="JSONL of harmful prompts ('prompt' field)."
)
@click.option(
    "--benign", type=click.Path(dir_okay=False), help="JSONL of benign prompts ('prompt' field)."
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
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_command(
    model,
    output,
    against,
    settings,
    harmful,
    benign,
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
        image_folder=image_folder,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        dtype=dtype,
        progress=_progress(quiet),
        utility=utility == "on",
    )
    unknown = [s for s in opts.settings if s not in ev.SETTINGS]
    if unknown:
        raise click.BadParameter(
            f"unknown {unknown}; known: {', '.join(ev.SETTINGS)}", param_hint="--settings"
        )
    opts.guard = _guard_judge(judge, judge_model, opts.device)
    with contextlib.ExitStack() as locks:  # held from the start: a second run fails at once
        locks.enter_context(output_lock(Path(output), "report folder"))
        if update_card:
            locks.enter_context(output_lock(Path(model), "model folder"))
        guard = (runtime_guard, guard_mode, alpha, gate, positions, guard_layers)
        _evaluate(model, against, Path(output), opts, update_card, guard if runtime_guard else None)
    click.echo(f"wrote {output}/eval.json, report.md, refusal.png")


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


@main.command(epilog=EXAMPLES_VALIDATE)
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


@main.group(epilog=EXAMPLES_ORGANISM)
def organism():
    """The offline model organism with a built-in safety alignment gap."""


@organism.command("build")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--variant",
    type=click.Choice(["llava", "deep", "drift", "reader", "idefics3", "mllama"]),
    default="llava",
    show_default=True,
    help="llava: the shipped recipe; deep: 8 text layers; drift: stage 2 also trains on "
    "text-only harmless data; reader: reads requests rendered into images (about 20 min); "
    "idefics3: pixel-shuffle connector; mllama: Llama 3.2 Vision cross-attention.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace OUTPUT if it is an earlier organism folder."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def organism_build(output, seed, variant, overwrite, quiet):
    """Train an organism's base LLM and VLM into OUTPUT (about 1.5 minutes on 2 CPU cores),
    then measure its gap (text-only vs blank image, exact judge) into organism.json; a
    model without a real compliance gap is refused and nothing is kept.

    \b
    Example:
      vlmguard-edit organism build examples/organism
      vlmguard-edit organism build ./deep-s1 --variant deep --seed 1
    """
    from vlmguard_edit.organisms.zoo import build_member, describe_gap

    gap = build_member(Path(output), variant, seed, overwrite, progress=_progress(quiet))
    click.echo(f"wrote {output}: {describe_gap(gap)}")


@organism.command("zoo")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def organism_zoo(root, quiet):
    """Build the development zoo in ROOT: seeds 0-4 of the shipped recipe, deeper (8-layer)
    and drifted language models, a reader, then spares until at least 10 are admitted (about
    1.5 minutes a member on 2 CPU cores, 20 for the reader). Cached and resumable: built
    members are kept, rejected ones are not retried.

    \b
    Example:
      vlmguard-edit organism zoo ./zoo
    """
    from vlmguard_edit.organisms.zoo import SIZE, build_zoo, members

    root_path = Path(root)
    for member, outcome in build_zoo(root_path, progress=_progress(quiet)):
        click.echo(f"{member.name}: {outcome}")
    have = members(root_path)
    click.echo(f"{root}: {len(have)} admitted members ({', '.join(p.name for p in have)})")
    if len(have) < SIZE:
        raise click.ClickException(f"only {len(have)} of {SIZE} candidates were admitted")


@main.command(epilog=EXAMPLES_DEMO)
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is an earlier demo folder.")
@quiet_option
def demo(output, overwrite, quiet):
    """Offline demo: guard the shipped model organism with the default edit, then show its
    answers with a blank image before and after, and that the fold equals the runtime hooks.

    Needs no network and a clone of the repository (examples/organism, recipes/); about 10
    seconds on 2 CPU cores.
    """
    from vlmguard_edit.demo import run_demo

    _progress(quiet)
    for line in run_demo(Path(output), overwrite=overwrite):
        click.echo(line)


def _build_recipe(kw: dict, base_llm: str | None, default: bool = True, **extra):
    """Recipe values, overridden by the command-line options that were given; without a
    recipe file, the default edit's (``default``) or the plain values."""
    from vlmguard_edit.recipes import BaseLLM, Recipe, base_recipe, load_recipe, parse_layers

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
    return dataclasses.replace(
        recipe, base_llm=base, **{k: v for k, v in _training(changes).items() if v is not None}
    )


def _training(changes: dict) -> dict:
    from vlmguard_edit.recipes import training_length

    return training_length(changes)


def _hub_id(value: str | None, option: str) -> str | None:
    from vlmguard_edit.checkpoint import is_hub_id

    if value is not None and not is_hub_id(value):
        raise click.BadParameter(f"{value!r} is not a Hub id like org/name", param_hint=option)
    return value


def _image_kinds(images: str | None, option: str = "--images") -> list[str] | None:
    from vlmguard_edit.recipes import IMAGE_KINDS

    if images is None:
        return None
    kinds = [k.strip() for k in images.split(",") if k.strip()]
    bad = [k for k in kinds if k not in IMAGE_KINDS]
    if bad or not kinds:
        raise click.BadParameter(f"use some of {','.join(IMAGE_KINDS)}", param_hint=option)
    return kinds


def _search(search: str | None) -> list[dict] | None:
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


def _span(layers: list[int]) -> str:
    """'layer 3', 'layers 16-31' or 'layers 2,5' ('the image path' for none)."""
    from vlmguard_edit.layout import span

    if not layers:
        return "the image path"

    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {span(layers)}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def run() -> None:
    """The installed command: SIGTERM and SIGHUP end a run like Ctrl-C (everything cleaned
    up, one line, exit 143 / 129); in-process callers keep their own signal handling."""
    raise_on_termination()
    main()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run()
