"""organism build / zoo and demo: the offline model organisms."""

from __future__ import annotations

from pathlib import Path

import click

from .common import progress, quiet_option

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


@click.group(epilog=EXAMPLES_ORGANISM)
def organism():
    """The offline model organism with a built-in safety alignment gap."""


@organism.command("build")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--variant",
    default="llava",
    show_default=True,
    help="llava: the shipped recipe; deep: 8 text layers; drift: stage 2 also trains on "
    "text-only harmless data; reader: reads requests rendered into images (about 20 min); "
    "idefics3: pixel-shuffle connector; mllama: Llama 3.2 Vision cross-attention; "
    "idefics3-reader: a reader on Idefics3's path (64 image tokens). NAME-wide (all but the "
    "readers): 112 px images read as 64 image tokens, a pixel attack's surface.",
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
      vlmguard-edit organism build ./llava-wide-s0 --variant llava-wide
    """
    from vlmguard_edit.organisms.zoo import build_member, describe_gap

    gap = build_member(Path(output), variant, seed, overwrite, progress=progress(quiet))
    click.echo(f"wrote {output}: {describe_gap(gap)}")


@organism.command("zoo")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def organism_zoo(root, quiet):
    """Build the development zoo in ROOT: seeds of the shipped recipe, deeper (8-layer) and
    drifted language models, Idefics3 and mllama image paths, the wide-channel version of
    each (112 px, 64 image tokens), readers on LLaVA's and Idefics3's image paths; then
    spares until every quota (3 readers, one wide member of each family) is met and at least
    15 are admitted. About 2 minutes a member on 2 CPU cores, 10-20 a reader. Cached and
    resumable: built members are kept, rejected ones are not retried; prints the zoo's hash.

    \b
    Example:
      vlmguard-edit organism zoo ./zoo
    """
    from vlmguard_edit.organisms.zoo import build_zoo, members, shortfall, zoo_hash

    root_path = Path(root)
    for member, outcome in build_zoo(root_path, progress=progress(quiet)):
        click.echo(f"{member.name}: {outcome}")
    have = members(root_path)
    click.echo(f"{root}: {len(have)} admitted members ({', '.join(p.name for p in have)})")
    click.echo(f"zoo hash {zoo_hash(have)[:12]} (sha256 of the members' names and weights)")
    if shortfall(root_path):
        raise click.ClickException(f"the zoo is short: {'; '.join(shortfall(root_path))}")


@click.command(epilog=EXAMPLES_DEMO)
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

    progress(quiet)
    for line in run_demo(Path(output), overwrite=overwrite):
        click.echo(line)
