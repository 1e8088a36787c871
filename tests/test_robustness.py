"""Every way a run can end leaves nothing behind; two runs never write one output; no write
goes through a link. Real signals, real processes, the installed command."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from vlmguard_edit.writes import output_lock

COMMAND = Path(sys.executable).parent / "vlmguard-edit"
ORGANISM = Path(__file__).parent.parent / "examples" / "organism"
# Loaded at start-up by the installed command (PYTHONPATH): torch first, so that a signal
# lands in the copy phase and not inside an import, and copies that take DELAY s each.
# SIGINT is set back to Python's default: a shell starts a background job with it ignored,
# and a child inherits that (a CI run in the background would otherwise never see Ctrl-C).
SITECUSTOMIZE = """
import signal, time, torch, vlmguard_edit.convert as c
signal.signal(signal.SIGINT, signal.default_int_handler)
real = c.copy_file
def slow(*a):
    time.sleep({delay})
    real(*a)
c.copy_file = slow
"""


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".vlmguard-" in p.name)


def convert_args(src, out, direction_file):
    args = ["convert", src, "-o", out, "--direction", direction_file, "--layers", "1,3", "-q"]
    return [str(a) for a in args]


def start_slow(tmp_path, args, delay=1.0) -> subprocess.Popen:
    """The installed command with slowed copies, started in the background."""
    hooks = tmp_path / f"hooks-{delay}"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE.format(delay=delay))
    env = {**os.environ, "PYTHONPATH": str(hooks)}
    return subprocess.Popen([str(COMMAND), *args], stderr=subprocess.PIPE, text=True, env=env)


def wait_for_copying(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        tmp = list(out.parent.glob(f".{out.name}.vlmguard-tmp-*"))
        if tmp and any(tmp[0].iterdir()):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended before copying was seen: {proc.poll()}")


@pytest.mark.parametrize(
    ("signum", "code", "name"),
    [(signal.SIGINT, 130, ""), (signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")],
)
def test_signal_mid_copy_leaves_nothing(vlm_factory, direction_file, tmp_path, signum, code, name):
    out = tmp_path / "out" / "guarded"
    proc = start_slow(tmp_path, convert_args(vlm_factory(shards=True), out, direction_file))
    wait_for_copying(proc, out)
    os.kill(proc.pid, signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    # One line says what happened; before it, only the writers kind's standing warning
    # (the run folds a direction file, which convert folds as writers).
    *before, last = stderr.strip().splitlines()
    assert last.startswith("interrupted") and name in last, stderr
    assert "nothing was written" in last
    assert all(line.startswith("WARNING") and "writers" in line for line in before), stderr
    assert not out.exists() and leftovers(out.parent) == []


def test_killed_run_is_cleaned_up_by_the_next(vlm_factory, direction_file, tmp_path):
    out = tmp_path / "out" / "guarded"
    args = convert_args(vlm_factory(shards=True), out, direction_file)
    proc = start_slow(tmp_path, args)
    wait_for_copying(proc, out)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=60)
    stale = [n for n in leftovers(out.parent) if "-tmp-" in n]
    assert stale == [f".guarded.vlmguard-tmp-{proc.pid}"]
    result = subprocess.run([str(COMMAND), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"removed {out.parent / stale[0]}" in result.stderr, result.stderr
    assert "process is gone" in result.stderr
    assert leftovers(out.parent) == [] and (out / "vlmguard.json").is_file()


def test_two_converts_to_one_output(vlm_factory, direction_file, tmp_path):
    out = tmp_path / "out" / "guarded"
    args = convert_args(vlm_factory(shards=True), out, direction_file)
    first = start_slow(tmp_path, args, delay=2.0)
    wait_for_copying(first, out)
    second = subprocess.run([str(COMMAND), *args], capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the second run must fail while the first still runs"
    assert second.returncode == 1, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "being written by another vlmguard-edit run" in lines[0]
    assert f"pid {first.pid}" in lines[0]
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert leftovers(out.parent) == []
    verified = CliRunner().invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output


def test_direction_and_eval_outputs_are_locked(base_llm, tmp_path):
    target = tmp_path / "d.safetensors"
    report = tmp_path / "report"
    with output_lock(target), output_lock(report):  # another run holds both
        direction = CliRunner().invoke(main, ["direction", str(base_llm), "-o", str(target)])
        evaluated = CliRunner().invoke(main, ["eval", str(ORGANISM / "vlm"), "-o", str(report)])
    for result in (direction, evaluated):
        assert result.exit_code == 1
        assert "being written by another vlmguard-edit run" in result.stderr
        assert f"pid {os.getpid()}" in result.stderr
    assert not target.exists() and not report.exists()


def test_direction_removes_what_a_dead_run_left(base_llm, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: what a run killed earlier leaves
    target = tmp_path / "d.safetensors"
    stale = tmp_path / f".d.safetensors.vlmguard-tmp-{dead.pid}"
    stale.write_bytes(b"half a file")
    args = ["direction", str(base_llm), "-o", str(target), "--layers", "1", "-q"]
    result = subprocess.run([str(COMMAND), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "interrupted run" in result.stderr and not stale.exists() and target.is_file()
    assert leftovers(tmp_path) == []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def guarded_organism(tmp_path_factory):
    out = tmp_path_factory.mktemp("guarded") / "organism-guarded"
    recipe = Path(__file__).parent.parent / "recipes" / "organism.yaml"
    args = ["convert", str(ORGANISM / "vlm"), "--recipe", str(recipe), "-o", str(out), "-q"]
    # The recipe's edit ships learned beside the organism: folding it takes seconds, where
    # learning it again took minutes of the suite (these tests are about the card, not it).
    edit = ORGANISM / "guard-edit.safetensors"
    result = CliRunner().invoke(main, [*args, "--direction", str(edit)])
    assert result.exit_code == 0, result.output
    return out


def update_card(model: Path, report: Path):
    args = ["eval", str(model), "-o", str(report), "--update-card", "--settings", "text"]
    args += ["--limit", "2", "--max-new-tokens", "4", "-q"]
    args += ["--harmful", str(ORGANISM / "eval_harmful.jsonl")]
    args += ["--benign", str(ORGANISM / "eval_benign.jsonl")]
    return CliRunner().invoke(main, args)


def test_update_card_on_a_hub_cache_snapshot(guarded_organism, tmp_path):
    """The Hub cache's layout: snapshots/REV/NAME -> ../../blobs/HASH. The blobs are shared
    by every snapshot and must never change."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in guarded_organism.iterdir():
        blob = blobs / digest(file)
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    before = {blob.name: digest(blob) for blob in blobs.iterdir()}
    result = update_card(snapshot, tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert {blob.name: digest(blob) for blob in blobs.iterdir()} == before
    assert (
        not (snapshot / "README.md").is_symlink() and not (snapshot / "vlmguard.json").is_symlink()
    )
    assert "## Evaluation" in (snapshot / "README.md").read_text()
    assert CliRunner().invoke(main, ["verify", str(snapshot)]).exit_code == 0


def test_update_card_on_a_hard_linked_copy(guarded_organism, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(guarded_organism, copy, copy_function=os.link)  # cp -al
    assert os.stat(copy / "README.md").st_ino == os.stat(guarded_organism / "README.md").st_ino
    card_before = (guarded_organism / "README.md").read_text()
    record_before = (guarded_organism / "vlmguard.json").read_text()
    result = update_card(copy, tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "## Evaluation" in (copy / "README.md").read_text()
    assert (guarded_organism / "README.md").read_text() == card_before
    assert (guarded_organism / "vlmguard.json").read_text() == record_before
    for folder in (copy, guarded_organism):
        verified = CliRunner().invoke(main, ["verify", str(folder)])
        assert verified.exit_code == 0, verified.output
    assert json.loads((copy / "vlmguard.json").read_text())["files"]["eval/eval.json"]


def test_update_card_with_a_hub_id_is_refused_before_evaluating(tmp_path):
    result = update_card("some-org/some-guarded-model", tmp_path / "report")
    assert result.exit_code == 1
    assert "not a local folder" in result.stderr and "hf download" in result.stderr
    assert not (tmp_path / "report").exists()


def test_organism_build_is_atomic_and_locked(tmp_path, monkeypatch):
    """The organism is built beside OUT and renamed into place (training and the gap
    measurement stubbed: the CLI's handling is what is tested); a failed build leaves the
    earlier organism as it was."""
    import vlmguard_edit.organisms.organism as organism
    import vlmguard_edit.organisms.zoo as zoo

    def fake_build(out, seed, progress, variant):
        assert ".vlmguard-tmp-" in out.name  # never the final folder
        (out / "organism.json").write_text(json.dumps({"seed": seed, "variant": variant}))
        if seed == 99:
            raise RuntimeError("training diverged")
        return out

    gap = {s: {"refusal": 1.0, "compliance": 0.5, "derailed": 0.0} for s in ("text", "blank")}
    monkeypatch.setattr(organism, "build_organism", fake_build)
    monkeypatch.setattr(zoo, "record_gap", lambda folder: gap)
    out = tmp_path / "org"
    first = CliRunner().invoke(main, ["organism", "build", str(out), "--seed", "1", "-q"])
    assert first.exit_code == 0, first.output
    assert "text-only refusal 100%" in first.output
    failed = CliRunner().invoke(
        main, ["organism", "build", str(out), "--seed", "99", "--overwrite"]
    )
    assert failed.exit_code == 1 and "training diverged" in failed.stderr
    assert json.loads((out / "organism.json").read_text()) == {"seed": 1, "variant": "llava"}
    assert leftovers(tmp_path) == []


def test_an_interrupt_wrapped_in_an_error_is_reported_as_the_interrupt():
    """A Ctrl-C landing while a class is created (a module imported mid-run) reaches the
    CLI as RuntimeError('Error calling __set_name__ ...') from the KeyboardInterrupt."""
    import click
    from click.testing import CliRunner

    from cli import Main
    from vlmguard_edit.errors import Terminated

    @click.group(cls=Main)
    def group():
        pass

    @group.command()
    @click.option("--signal", "which", default="")
    def boom(which):
        interrupt = Terminated(signal.SIGTERM) if which else KeyboardInterrupt()
        raise RuntimeError("Error calling __set_name__") from interrupt

    result = CliRunner().invoke(group, ["boom"])
    assert result.exit_code == 130 and result.output.startswith("interrupted: nothing was written")
    result = CliRunner().invoke(group, ["boom", "--signal", "x"])
    assert result.exit_code == 143 and "interrupted by SIGTERM" in result.output

    @group.command()
    def plain():
        raise RuntimeError("disk on fire")

    result = CliRunner().invoke(group, ["plain"])
    assert result.exit_code == 1 and "error: RuntimeError: disk on fire" in result.output
