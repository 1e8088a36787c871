"""The CLI through click's CliRunner, and once as the installed command."""

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def commands():
    """(path, command) for every command and subcommand."""
    out = []
    for name, command in main.commands.items():
        out.append(([name], command))
        for sub, inner in getattr(command, "commands", {}).items():
            out.append(([name, sub], inner))
    return out


def examples(help_text: str) -> list[list[str]]:
    """The example command lines of a --help text, continuation lines joined."""
    lines, joined = help_text.split("Example")[1].splitlines()[1:], []
    for line in lines:
        line = line.strip()
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        elif line.startswith("vlmguard-edit "):
            joined.append(line)
    return [shlex.split(line) for line in joined]


@pytest.mark.parametrize(
    ("path", "command"), commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_every_help_has_runnable_examples(path, command):
    """Every command shows examples; each names its own command and only options it has."""
    result = run([*path, "--help"])
    assert result.exit_code == 0 and "Example" in result.output, result.output
    found = examples(result.output)
    assert found, result.output
    for words in found:
        assert words.count("vlmguard-edit") == 1, words  # no two examples run together
        if words[1 : 1 + len(path)] != path:
            continue  # e.g. the group's help names its subcommands
        target = command.commands[words[2]] if hasattr(command, "commands") else command
        known = {o for p in target.params for o in (*p.opts, *p.secondary_opts)}
        options = [w.split("=")[0] for w in words if w.startswith("-") and not w[1:2].isdigit()]
        unknown = [w for w in options if w not in known]
        assert not unknown, (words, unknown)
    assert run(["--version"]).output.startswith("vlmguard-edit, version")


def test_validate_recipes_folder():
    result = run(["validate", ROOT / "recipes"])  # from any working directory
    assert result.exit_code == 0, result.output
    assert f"ok      {ROOT / 'recipes' / 'llava-1.5-7b.yaml'}" in result.output


def test_validate_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: a/b\nrank: -1\nbetta: 2\n")
    result = run(["validate", bad, "recipes/llava-1.5-13b.yaml"])
    assert result.exit_code == 1
    assert "invalid " in result.output and "ok      recipes/llava-1.5-13b.yaml" in result.output
    assert (
        "  - betta: unknown key" in result.output
        and "  - rank: expected an integer >= 1" in result.output
    )


def test_dry_run_prints_plan(vlm_factory, direction_file, tmp_path):
    out = tmp_path / "out"
    result = run(
        [
            "convert",
            vlm_factory(),
            "-o",
            out,
            "--direction",
            direction_file,
            "--layers",
            "0-1",
            "--dry-run",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.output
    assert "4 tensors change in 2 layers" in result.output
    assert "layer   1  language_model.model.layers.1.mlp.down_proj.weight" in result.output
    assert not out.exists()


def test_usage_errors(vlm_factory, direction_file, tmp_path, base_llm):
    out = tmp_path / "out"
    both = run(
        ["convert", vlm_factory(), "-o", out, "--base-llm", base_llm, "--direction", direction_file]
    )
    assert both.exit_code == 2 and "not both" in both.output
    neither = run(["convert", vlm_factory(), "-o", out, "--mode", "writers", "--layers", "1"])
    assert (
        neither.exit_code == 1 and "say where the steering direction comes from" in neither.stderr
    )
    bad_layers = run(["convert", vlm_factory(), "-o", out, "--layers", "x"])
    assert bad_layers.exit_code == 2 and "--layers" in bad_layers.output
    assert not out.exists()


def test_recipe_supplies_model_and_base(vlm_factory, base_llm, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"model: {vlm_factory()}\nmode: writers\nbase_llm:\n  id: {base_llm}\nlayers: [2]\n"
        "rank: 2\nbeta: 1.5\n"
    )
    out = tmp_path / "out"
    result = run(["convert", "--recipe", recipe, "-o", out, "--rank", "1", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "vlmguard.json").read_text())
    assert record["recipe"]["rank"] == 1 and record["recipe"]["beta"] == 1.5  # CLI overrides recipe
    assert record["recipe"]["layers"] == [2]


def test_direction_command(base_llm, vlm_factory, tmp_path):
    out = tmp_path / "ssd.safetensors"
    result = run(["direction", base_llm, "-o", out, "--layers", "1-2", "--rank", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "layer   1: explained" in result.output and out.is_file()
    again = run(["direction", base_llm, "-o", out, "--layers", "1"])
    assert again.exit_code == 2 and "already exists" in again.output
    assert (
        run(["direction", base_llm, "-o", out, "--layers", "1", "--overwrite", "-q"]).exit_code == 0
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ssd.safetensors"]  # no partial files
    self_out = tmp_path / "self.safetensors"
    missing_vlm = run(["direction", "self", "-o", self_out])
    assert missing_vlm.exit_code == 2 and "--vlm" in missing_vlm.output
    ok = run(["direction", "self", "--vlm", vlm_factory(), "-o", self_out, "-q"])
    assert ok.exit_code == 0, ok.output
    assert "layers 2-3" in ok.output  # default: the upper half of 4 layers


def test_demo(tmp_path):
    """The demo guards the shipped organism with the default edit: each harmful request with
    a blank image is complied with before and refused after, the harmless one is answered
    both times, and the fold equals the runtime hooks while changing the model visibly."""
    result = run(["demo", tmp_path / "demo"])
    assert result.exit_code == 0, result.output
    gap = float(result.output.split("runtime hooks)| = ")[1].split()[0])
    effect = float(result.output.split("logits(original)| = ")[1].split()[0])
    assert gap < 1e-5 < 0.05 < effect
    lines = result.output.splitlines()
    harmful = [i for i, line in enumerate(lines) if line.strip().startswith("harmful ")]
    harmless = [i for i, line in enumerate(lines) if line.strip().startswith("harmless")]
    assert len(harmful) == 3 and len(harmless) == 1
    assert all("[refusal]" in lines[i + 2] and "[refusal]" not in lines[i + 1] for i in harmful)
    assert any("[compliance]" in lines[i + 1] for i in harmful)
    assert all("[compliance]" in lines[i + 1] and "[compliance]" in lines[i + 2] for i in harmless)
    record = tmp_path / "demo" / "organism-guarded" / "vlmguard.json"
    assert '"mode": "lowrank-attention"' in record.read_text()
    again = run(["demo", tmp_path / "demo"])
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_installed_command(vlm_factory, direction_file, tmp_path):
    exe = shutil.which("vlmguard-edit")
    if exe is None:
        pytest.fail("the vlmguard-edit console script is not installed (pip install -e .)")
    out = tmp_path / "out"
    args = [
        exe,
        "convert",
        str(vlm_factory()),
        "-o",
        str(out),
        "--direction",
        str(direction_file),
        "--layers",
        "1",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: 2 tensors edited in layer 1 (")
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert (
        again.returncode == 1
        and again.stderr.strip().startswith("error: output")
        and "already exists" in again.stderr
    )


def test_quiet_silences_library_progress_bars(base_llm, tmp_path, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    enable_progress_bars()  # the suite runs with them off (conftest); -q must turn them off
    hf_logging.enable_progress_bar()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        out = tmp_path / "ssd.safetensors"
        result = run(["-q", "direction", base_llm, "-o", out, "--layers", "1"])  # -q first
        assert result.exit_code == 0, result.output
        assert are_progress_bars_disabled()
        assert "Loading weights" not in result.output and "it/s" not in result.output
    finally:
        hf_logging.disable_progress_bar()


@pytest.mark.parametrize(
    ("path", "command"), commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_quiet_is_accepted_everywhere(path, command):
    """-q after every command that runs something, and before any command."""
    if not hasattr(command, "commands"):
        assert "-q, --quiet" in run([*path, "--help"]).output
    assert run(["-q", *path, "--help"]).exit_code == 0


def test_an_explicit_training_length_replaces_the_recipes_search():
    """--epochs / --learning-rate without --search: that length is trained, not the search."""
    from vlmguard_edit.commands.common import build_recipe

    recipe = str(Path(__file__).parent.parent / "recipes" / "organism.yaml")

    def build(**extra):
        kw = dict.fromkeys(("layers", "template", "base_revision", "rank", "anchors"))
        kw |= {"recipe": recipe, "batch_size": None}
        return build_recipe(kw, None, **extra)

    assert len(build(epochs=None, learning_rate=None, search=None).search) == 2
    assert build(epochs=3, learning_rate=None, search=None).search == []
    assert build(epochs=None, learning_rate=0.01, search=None).search == []
    kept = [{"epochs": 5, "learning_rate": 0.002}]
    assert build(epochs=3, learning_rate=None, search=kept).search == kept
