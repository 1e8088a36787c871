"""inspect, verify, adapter and push: what a model is, and publishing a guarded one."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import counted, progress, push_folder, quiet_option

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


@click.command(epilog=EXAMPLES_INSPECT)
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

    progress(quiet)  # the Hub's download bars
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


@click.command(epilog=EXAMPLES_VERIFY)
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

    report = run_verify(folder, source, progress=progress(quiet))
    for line in report.checked:
        click.echo(f"checked   {line}")
    for line in report.problems:
        click.echo(f"MISMATCH  {line}")
    if not report.ok:
        click.echo(f"{folder}: {counted(len(report.problems), 'problem')}", err=True)
        sys.exit(1)
    click.echo(f"{folder}: verified")


@click.command(epilog=EXAMPLES_ADAPTER)
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

    progress(quiet)  # transformers' bars while the model is built on the meta device
    config = write_adapter(folder, source, output, overwrite)
    click.echo(
        f"wrote {output}: LoRA rank {config['r']} on {len(config['target_modules'])} modules"
    )


@click.command(epilog=EXAMPLES_PUSH)
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
    progress(quiet)  # the upload bars
    push_folder(Path(folder), repo_id, private, revision, commit_message)
