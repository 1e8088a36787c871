"""Every bad input: one clear line naming the problem, a non-zero exit, nothing left behind."""

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from vlmguard_edit.organisms import tiny


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, out, phrase, code=1):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("error:", "interrupted:")), result.stderr
    assert phrase in lines[0], lines[0]
    assert not out.exists(), "no output folder may be left behind"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if ".vlmguard-" in p.name]
        assert not leftovers, leftovers


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out" / "guarded"


def writers_args(src, out, base_llm, *extra):
    """convert with the design's projection measured on ``base_llm`` (layer 1)."""
    return ["convert", src, "-o", out, "--mode", "writers", "--base-llm", base_llm, *extra]


def convert_args(src, out, direction_file, *extra):
    return [
        "convert",
        src,
        "-o",
        out,
        "--direction",
        direction_file,
        "--layers",
        "1,3",
        "-q",
        *extra,
    ]


def test_missing_path(tmp_path, out, direction_file):
    assert_refused(run(convert_args(tmp_path / "nope", out, direction_file)), out, "does not exist")


def test_hub_id_offline(out, direction_file):
    result = run(convert_args("no-such-org/no-such-model", out, direction_file))
    assert_refused(result, out, "could not be downloaded")


def test_not_a_checkpoint(tmp_path, out, direction_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(run(convert_args(empty, out, direction_file)), out, "has no config.json")
    (empty / "config.json").write_text("{}")
    assert_refused(run(convert_args(empty, out, direction_file)), out, "not a checkpoint")


def test_missing_shard(vlm_copy, out, direction_file):
    src = vlm_copy(shards=True)
    sorted(src.glob("model-*.safetensors"))[2].unlink()
    assert_refused(
        run(convert_args(src, out, direction_file)),
        out,
        "named in model.safetensors.index.json but missing",
    )


def test_truncated_shard(vlm_copy, out, direction_file):
    src = vlm_copy(shards=True)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(run(convert_args(src, out, direction_file)), out, "truncated or corrupt")


def test_corrupt_header(vlm_copy, out, direction_file):
    src = vlm_copy()
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12
    (src / "model.safetensors").write_bytes(bytes(data))
    assert_refused(run(convert_args(src, out, direction_file)), out, "corrupt safetensors header")


def test_hidden_size_mismatch(tmp_path, vlm_factory, out, direction_file):
    small = tiny.build_base(tmp_path / "small-base", hidden=32)
    args = writers_args(vlm_factory(), out, small, "--layers", "1", "-q")
    assert_refused(run(args), out, "hidden size of the base LLM")
    other = tmp_path / "small.safetensors"
    from vlmguard_edit.direction import Direction

    Direction({1: torch.eye(32)[:1]}, meta={"rank": 1}).save(other)
    assert_refused(run(convert_args(vlm_factory(), out, other)), out, "has hidden size 32")


def test_base_llm_without_tokenizer(tmp_path, vlm_factory, base_llm, out):
    bare = tmp_path / "bare-base"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base_llm / name, bare)
    args = writers_args(vlm_factory(), out, bare, "--layers", "1", "-q")
    assert_refused(run(args), out, "cannot load the tokenizer")


def test_layer_out_of_range(vlm_factory, out, direction_file):
    result = run(
        ["convert", vlm_factory(), "-o", out, "--direction", direction_file, "--layers", "2,9"]
    )
    assert_refused(result, out, "out of range: the model has text layers 0..3")


def test_rank_larger_than_anchors(tmp_path, vlm_factory, base_llm, out):
    anchors = tmp_path / "three.jsonl"
    anchors.write_text(
        "".join(
            json.dumps({"harmful": f"How to hurt {i}", "harmless": f"How to help {i}"}) + "\n"
            for i in range(3)
        )
    )
    args = writers_args(vlm_factory(), out, base_llm, "--anchors", anchors, "--rank", "5")
    args += ["--layers", "1"]
    assert_refused(run(args), out, "rank 5 needs at least 5 anchor pairs")


def test_pickle_only_vlm_refused(tmp_path, out, direction_file, vlm_factory):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(vlm_factory() / "config.json", src)
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    assert_refused(run(convert_args(src, out, direction_file)), out, "has only pickle weights")


def test_pickle_only_base_llm_needs_flag(tmp_path, vlm_factory, base_llm, out):
    base = tmp_path / "pickled-base"
    shutil.copytree(base_llm, base)
    from safetensors.torch import load_file

    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    args = writers_args(vlm_factory(), out, base, "--layers", "1", "-q")
    assert_refused(run(args), out, "--allow-pickle")
    result = run([*args, "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert (out / "vlmguard.json").is_file()


def test_quantized_refused(vlm_copy, out, direction_file):
    src = vlm_copy()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    assert_refused(run(convert_args(src, out, direction_file)), out, "is quantized (gptq)")


def test_output_exists_and_overwrite(vlm_factory, out, direction_file):
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    assert_refused_keep = run(convert_args(vlm_factory(), out, direction_file))
    assert assert_refused_keep.exit_code == 1 and "already exists" in assert_refused_keep.stderr
    refused = run(convert_args(vlm_factory(), out, direction_file, "--overwrite"))
    assert refused.exit_code == 1 and "not a vlmguard-edit output" in refused.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    first = run(convert_args(vlm_factory(), out, direction_file, "--overwrite"))
    assert first.exit_code == 0, first.output
    again = run(convert_args(vlm_factory(), out, direction_file))
    assert again.exit_code == 1 and "already exists" in again.stderr
    replaced = run(
        [*convert_args(vlm_factory(), out, direction_file, "--overwrite"), "--beta", "2"]
    )
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "vlmguard.json").read_text())["recipe"]["beta"] == 2.0
    assert not [p for p in out.parent.iterdir() if ".vlmguard-" in p.name]


def test_output_inside_source(vlm_copy, direction_file):
    src = vlm_copy()
    inside = src / "guarded"
    result = run(convert_args(src, inside, direction_file))
    assert_refused(result, inside, "is inside the source")


def test_disk_full_mid_write(vlm_factory, out, direction_file, monkeypatch):
    real_copy = shutil.copyfile
    calls = []

    def filling_copy(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 3:
            with open(dst, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr("vlmguard_edit.checkpoint.shutil.copyfile", filling_copy)
    result = run(convert_args(vlm_factory(shards=True), out, direction_file))
    assert len(calls) >= 3  # a second copy worker may have started one more
    assert_refused(result, out, "the disk filled up while writing")


def test_ctrl_c_mid_run(vlm_factory, out, direction_file, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlmguard_edit.checkpoint.ShardPatcher.write", interrupted)
    result = run(convert_args(vlm_factory(shards=True), out, direction_file))
    assert_refused(result, out, "interrupted", code=130)


def test_ctrl_c_while_copies_are_queued(vlm_factory, out, direction_file, monkeypatch):
    """Ctrl-C while the writer is still queueing copies (copies already running): the
    running copies are waited for before the temporary folder is removed, so none of them
    writes into it afterwards and leaves it behind (seen once under load in CI)."""
    import vlmguard_edit.convert as convert_module

    real_copy, submitted = convert_module.copy_file, []

    def slow_copy(*args):
        time.sleep(0.3)
        real_copy(*args)

    class InterruptedPool(convert_module.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(fn)
            if len(submitted) == 4:  # two copies running, one queued: Ctrl-C now
                raise KeyboardInterrupt
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(convert_module, "copy_file", slow_copy)
    monkeypatch.setattr(convert_module, "ThreadPoolExecutor", InterruptedPool)
    result = run(convert_args(vlm_factory(shards=True), out, direction_file))
    assert len(submitted) == 4
    assert_refused(result, out, "interrupted", code=130)
    time.sleep(0.5)  # a copy that outlived the run would have re-created the folder by now
    assert not [p for p in out.parent.iterdir() if ".vlmguard-" in p.name]


@pytest.mark.parametrize("beta", ["0", "nan", "inf", "-inf"])
def test_strengths_that_cannot_be_right_are_refused_first(vlm_factory, out, direction_file, beta):
    result = run([*convert_args(vlm_factory(), out, direction_file), f"--beta={beta}"])
    assert result.exit_code == 2, result.output
    assert "changes nothing" in result.stderr if beta == "0" else "finite" in result.stderr
    assert not out.parent.exists() or leftovers(out.parent) == []
    assert not out.exists()


def test_projector_shift_gamma_zero_refused(vlm_factory, out, direction_file):
    args = ["convert", vlm_factory(), "-o", out, "--direction", direction_file, "--layers", "1"]
    result = run([*args, "--mode", "projector-shift", "--gamma", "0"])
    assert result.exit_code == 2 and "gamma: 0 changes nothing" in result.stderr


def test_no_op_recipe_invalid(tmp_path):
    from vlmguard_edit.errors import RecipeError
    from vlmguard_edit.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("mode: writers\nbase_llm: self\nbeta: 0\n")
    with pytest.raises(RecipeError, match="beta: 0 changes nothing"):
        load_recipe(path)
    result = run(["validate", path])
    assert result.exit_code == 1 and "beta: 0 changes nothing" in result.output


def test_strength_outside_measured_range_warns(vlm_factory, out, direction_file, tmp_path, caplog):
    result = run([*convert_args(vlm_factory(), out, direction_file), "--beta", "-1e9"])
    assert result.exit_code == 0, result.output
    assert "beta -1e+09 is outside the measured range [-2, 4]" in caplog.text
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mode: writers\nbase_llm: self\nbeta: 50\n")
    validated = run(["validate", recipe])
    assert validated.exit_code == 0 and "warning: beta 50 is outside" in validated.output


def test_edit_that_changes_nothing_is_an_error(vlm_factory, out, direction_file):
    """1e-30 is below float32's resolution: every folded tensor equals its source."""
    result = run([*convert_args(vlm_factory(), out, direction_file), "--beta", "1e-30"])
    assert_refused(result, out, "the edit changed none of the 4 planned tensors")


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".vlmguard-" in p.name]


def test_unwritable_output_parent_is_one_line(vlm_factory, direction_file, tmp_path, monkeypatch):
    """A parent that cannot hold files (here /proc), and one without write permission (root
    ignores permission bits, so os.access answers as for a normal user): one line naming the
    parent, before any work; nothing written."""
    special = run(convert_args(vlm_factory(), Path("/proc/guarded"), direction_file))
    assert special.exit_code == 1
    assert special.stderr.strip().splitlines() == [special.stderr.strip()]
    assert special.stderr.startswith("error: cannot write in /proc (for output guarded)")
    import vlmguard_edit.writes as writes

    locked = tmp_path / "read-only"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(writes.os, "access", lambda p, m: Path(p) != locked and real(p, m))
    result = run(convert_args(vlm_factory(), locked / "guarded", direction_file))
    assert_refused(result, locked / "guarded", f"cannot write in {locked} (permission denied)")


def test_mount_point_output_refused_before_work(vlm_factory, direction_file, tmp_path, monkeypatch):
    import vlmguard_edit.writes as writes

    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(writes.os.path, "ismount", lambda p: Path(p) == mount)
    result = run([*convert_args(vlm_factory(), mount, direction_file), "--overwrite"])
    assert result.exit_code == 1 and "is a mount point" in result.stderr
    assert list(mount.iterdir()) == [] and leftovers(tmp_path) == []


def test_config_without_text_config_says_what_is_missing(vlm_copy, out, direction_file):
    src = vlm_copy()
    config = json.loads((src / "config.json").read_text())
    del config["text_config"]
    (src / "config.json").write_text(json.dumps(config))
    assert_refused(run(convert_args(src, out, direction_file)), out, "has no text_config")


def test_eval_checks_before_loading(tmp_path):
    organism = Path(__file__).parent.parent / "examples" / "organism" / "vlm"
    missing = run(["eval", organism, "-o", tmp_path / "r", "--image-folder", tmp_path / "nope"])
    assert missing.exit_code == 2 and "is not a folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run(["eval", organism, "-o", tmp_path / "r", "--image-folder", tmp_path / "empty"])
    assert empty.exit_code == 1 and "has no images" in empty.stderr
    assert not (tmp_path / "r").exists()


def test_eval_on_a_folder_without_processor_files(vlm_factory, tmp_path):
    result = run(["eval", vlm_factory(), "-o", tmp_path / "r", "--limit", "1"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no usable processor files" in lines[0], result.stderr


def test_ctrl_c_while_reading_the_direction_is_an_interrupt(
    vlm_factory, out, direction_file, monkeypatch
):
    """An interrupt inside the direction reader stays an interrupt (exit 130), not "is not a
    readable direction file" (what wrapping safetensors' reader in `except Exception` gave)."""
    import vlmguard_edit.direction as direction_module

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(direction_module, "read_tensor", interrupted)
    assert_refused(run(convert_args(vlm_factory(), out, direction_file)), out, "interrupted", 130)


def test_corrupt_direction_file_is_one_line(vlm_factory, out, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert_refused(run(convert_args(vlm_factory(), out, bad)), out, "not a readable direction")
