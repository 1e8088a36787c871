"""verify and push, end to end: push runs the real huggingface_hub client (in a subprocess,
as users run it) against the local Hub server in tests/hub_server.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from cli import main
from tests.hub_server import MISSING_ORG, READ_TOKEN, WRITE_TOKEN, FakeHub
from vlmguard_edit.checkpoint import digest_file, file_entry, open_checkpoint
from vlmguard_edit.direction import Direction
from vlmguard_edit.record import RECORD, load_record, write_record

EXE = str(Path(sys.executable).parent / "vlmguard-edit")


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, vlm_factory, direction_file):
    out = tmp_path_factory.mktemp("guarded") / "out"
    source = vlm_factory(shards=True)
    args = ["convert", source, "-o", out, "--direction", direction_file, "--layers", "1,3", "-q"]
    result = run(args)
    assert result.exit_code == 0, result.output
    return source, out


@pytest.fixture
def damaged(guarded, tmp_path):
    """A private copy of the guarded folder, to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(guarded[1], copy)
    return copy


def test_verify_accepts_a_fresh_conversion(guarded):
    source, out = guarded
    record = load_record(out)
    assert set(record["files"]) == {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
    } - {RECORD}
    result = run(["verify", out, "--source", source, "-q"])
    assert result.exit_code == 0, result.output
    assert "4 edited tensors, exactly the plan" in result.output
    assert "edited tensors equal the recomputed fold (0 mismatches)" in result.output


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rehash(folder: Path, *names: str) -> None:
    """Make the record agree with a deliberate change (to reach the deeper checks)."""
    record = load_record(folder)
    for name in names:
        record["files"][name] = file_entry(folder / name)
    write_record(folder, record)


def test_verify_finds_a_changed_byte(damaged):
    shard = sorted(damaged.glob("model-*.safetensors"))[0]
    flip_byte(shard, shard.stat().st_size - 3)
    result = run(["verify", damaged])
    assert result.exit_code == 1
    assert f"MISMATCH  {shard.name}: blake3 hash differs" in result.output


def test_verify_finds_added_and_missing_files(damaged):
    (damaged / "extra.txt").write_text("not from the conversion")
    (damaged / "config.json").rename(damaged / "config.json.bak")
    result = run(["verify", damaged])
    assert result.exit_code == 1
    assert "extra.txt: not in vlmguard.json" in result.output
    assert "config.json: missing" in result.output


def test_verify_checks_edited_tensors_and_the_plan(damaged):
    record = load_record(damaged)
    dropped = record["edits"].pop()
    record["edits"][0]["blake3_after"] = "0" * 64
    write_record(damaged, record)
    result = run(["verify", damaged])
    assert result.exit_code == 1
    assert f"{dropped['key']}: the recipe implies an edit" in result.output
    assert f"{record['edits'][0]['key']}: edited tensor's blake3 hash differs" in result.output


def test_verify_against_the_source_recomputes_the_fold(guarded, damaged, tmp_path):
    source, _ = guarded
    # A different direction, with every hash in the record updated to match: only the
    # recomputation from the source can tell.
    direction = Direction.load(damaged / "vlmguard_direction.safetensors")
    direction.vectors = {k: v.flip(0) for k, v in direction.vectors.items()}  # V_l[1] first
    direction.save(damaged / "vlmguard_direction.safetensors")
    rehash(damaged, "vlmguard_direction.safetensors")
    record = load_record(damaged)
    record["direction"]["blake3"] = digest_file(damaged / "vlmguard_direction.safetensors")
    write_record(damaged, record)
    assert run(["verify", damaged]).exit_code == 0  # self-consistent
    result = run(["verify", damaged, "--source", source])
    assert result.exit_code == 1
    assert "differs from the fold recomputed from the source" in result.output
    # ...and an untouched tensor that differs from the source
    changed_source = tmp_path / "source"
    shutil.copytree(source, changed_source)
    checkpoint = open_checkpoint(changed_source)
    key = next(k for k in checkpoint.keys if "vision_tower" in k)
    info = checkpoint.info(key)
    flip_byte(changed_source / checkpoint.key_to_file[key], info.start)
    result = run(["verify", damaged, "--source", changed_source])
    assert f"{key}: differs from the source" in result.output


def online(args, hub_url, home: Path, token=WRITE_TOKEN, extra_env=None):
    """Run the installed command with the Hub at ``hub_url`` (and no offline switch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home / "hf"))
    env.update(extra_env or {})
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [EXE, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def push(folder, repo_id, hub_url, token=WRITE_TOKEN, *extra):
    return online(["push", folder, "--repo-id", repo_id, *extra], hub_url, folder.parent, token)


def test_convert_push_to_hub(vlm_factory, direction_file, tmp_path):
    out = tmp_path / "out"
    args = ["convert", vlm_factory(), "-o", out, "--direction", direction_file, "--layers", "2"]
    with FakeHub() as hub:
        done = online([*args, "--push-to-hub", "my-org/c"], hub.url, tmp_path)
        assert done.returncode == 0, done.stderr
        assert set(hub.files("my-org/c")) == {
            p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
        }
    assert "pushed" in done.stdout.splitlines()[-1]


def test_push_uploads_every_file_once(guarded):
    _, out = guarded
    with FakeHub() as hub:
        first = push(out, "my-org/guarded", hub.url, WRITE_TOKEN, "--private")
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("pushed ")
        files = hub.files("my-org/guarded")
        local = {
            p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
        }
        assert files == local  # every file, byte for byte
        assert hub.private["my-org/guarded"] is True
        uploads, commits = len(hub.lfs_uploads), len(hub.commits)
        assert uploads == len(list(out.glob("*.safetensors")))
        second = push(out, "my-org/guarded", hub.url)
        assert second.returncode == 0, second.stderr
        assert "nothing pushed" in second.stdout
        assert (len(hub.lfs_uploads), len(hub.commits)) == (uploads, commits)
        branch = push(out, "my-org/guarded", hub.url, WRITE_TOKEN, "--revision", "v2")
        assert branch.returncode == 0, branch.stderr
        assert hub.files("my-org/guarded", "v2") == local
    for done in (first, second, branch):
        assert WRITE_TOKEN not in done.stdout + done.stderr
    assert not any(WRITE_TOKEN.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("token", "repo_id", "message"),
    [
        ("hf_wrong", "my-org/guarded", "rejected the credentials (401)"),
        (None, "my-org/guarded", "rejected the credentials (401)"),
        (READ_TOKEN, "my-org/guarded", "no permission to write to my-org/guarded (403)"),
        (WRITE_TOKEN, f"{MISSING_ORG}/guarded", "was not found on"),
    ],
    ids=["bad-token", "no-token", "read-only-token", "missing-org"],
)
def test_push_errors_are_one_line(guarded, token, repo_id, message):
    _, out = guarded
    with FakeHub() as hub:
        done = push(out, repo_id, hub.url, token)
        assert hub.lfs_uploads == [] and hub.commits == []  # nothing half-pushed
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    for secret in (WRITE_TOKEN, READ_TOKEN, "hf_wrong"):
        assert secret not in done.stderr


@pytest.mark.parametrize(
    ("token", "repo_id", "env", "message"),
    [
        (WRITE_TOKEN, "my-org/c", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
        (READ_TOKEN, "my-org/c", {}, "the token of user is read-only"),
        (None, "my-org/c", {}, "no Hugging Face token: set HF_TOKEN"),
        (WRITE_TOKEN, "other-org/c", {}, "user cannot create repos in other-org"),
    ],
    ids=["offline", "read-only-token", "no-token", "foreign-namespace"],
)
def test_convert_push_to_hub_checks_before_converting(
    vlm_factory, direction_file, tmp_path, token, repo_id, env, message
):
    out = tmp_path / "out"
    args = ["convert", vlm_factory(), "-o", out, "--direction", direction_file, "--layers", "2"]
    with FakeHub() as hub:
        done = online([*args, "--push-to-hub", repo_id], hub.url, tmp_path, token, env)
        assert hub.repos == {} and hub.commits == []
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not out.exists()  # refused before converting


def silent_server():
    """A loopback TCP server that accepts connections and never answers (bounded: closed by
    the caller; it only holds what it accepted)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, held


def test_a_hub_that_never_answers_times_out(guarded, vlm_factory, direction_file, tmp_path):
    _, out = guarded
    server, held = silent_server()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {"VLMGUARD_HUB_READ_TIMEOUT": "1"}
    try:
        pushed = online(["push", out, "--repo-id", "my-org/x"], url, tmp_path, WRITE_TOKEN, env)
        target = tmp_path / "never"
        args = ["convert", vlm_factory(), "-o", target, "--direction", direction_file]
        converted = online([*args, "--push-to-hub", "my-org/x"], url, tmp_path, WRITE_TOKEN, env)
    finally:
        server.close()
        for connection in held:
            connection.close()
    expected = f"error: the Hub at {url} did not answer within 1 s (read timeout; "
    for done in (pushed, converted):
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert not target.exists()


def test_push_unreachable_hub(guarded):
    _, out = guarded
    done = push(out, "my-org/guarded", "http://127.0.0.1:9")  # nothing listens on port 9
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: cannot reach the Hub at http://127.0.0.1:9: check the network (or HF_ENDPOINT)"
    )


def test_push_refuses_bad_repo_ids_and_unverified_folders(guarded, damaged):
    _, out = guarded
    for bad in ("no-slash", "a/b/c", "bad name/x"):
        result = run(["push", out, "--repo-id", bad])
        assert result.exit_code == 1 and "bad --repo-id" in result.output
    (damaged / "extra.txt").write_text("x")
    result = run(["push", damaged, "--repo-id", "my-org/x"])
    assert result.exit_code == 1 and "refusing to push" in result.output
    never = damaged.parent / "never"
    conv = run(["convert", out, "-o", never, "--push-to-hub", "bad", "--layers", "1"])
    assert conv.exit_code == 1 and "bad --repo-id" in conv.output and not never.exists()


def test_card_metadata_parses_back(guarded):
    _, out = guarded
    card = ModelCard.load(out / "README.md")
    record = json.loads((out / RECORD).read_text())
    # A local source without a Hub id: no base_model to link, so no relation claimed either
    # (test_convert's provenance test checks the Hub-id case: both present).
    assert record["source"]["hub_id"] is None
    assert "base_model" not in card.data.to_dict()
    assert "base_model_relation" not in card.data.to_dict()
    assert "from_pretrained" in card.text and "vlmguard.json" in card.text


def test_inspect_a_hub_model_reads_headers_only(vlm_factory, tmp_path):
    """`inspect ORG/NAME` downloads the JSON files and reads the safetensors header with
    HTTP range requests: the weights themselves are never downloaded."""
    source = vlm_factory()  # one model.safetensors, no index
    with FakeHub() as hub:
        hub.repos["tiny-org/llava"] = {
            "main": {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
        }
        shown = online(["inspect", "tiny-org/llava"], hub.url, tmp_path, READ_TOKEN)
        requests = list(hub.requests)
    assert shown.returncode == 0, shown.stderr
    assert "key layout      language_model.model.layers.N" in shown.stdout
    assert "layers 0-3 (4 layers): self_attn.o_proj, mlp.down_proj" in shown.stdout
    weights = [r for r in requests if r.startswith("GET ") and r.endswith("model.safetensors")]
    assert not weights, weights  # no whole-file download
    assert any(r.endswith("/model.safetensors (range)") for r in requests), requests
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_verify_a_folder_made_by_hf_download(damaged):
    """`hf download REPO --local-dir DIR` adds the Hub's bookkeeping; verify ignores it and
    says so, and still reports a file that is really extra."""
    (damaged / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    meta = damaged / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "model.safetensors.metadata").write_text("abc\n")
    result = run(["verify", damaged])
    assert result.exit_code == 0, result.output
    assert "ignored 2 Hub download file(s) (.cache/huggingface/download/" in result.output
    (damaged / "notes.txt").write_text("x")
    assert run(["verify", damaged]).exit_code == 1


def test_self_test_of_a_hub_model_reads_its_config_only(tmp_path):
    """`inspect ORG/NAME --self-test` needs the config alone: nothing else is fetched."""
    import json as _json

    from vlmguard_edit.selftest import for_model_type

    config = _json.dumps(for_model_type("idefics3")).encode()
    with FakeHub() as hub:
        hub.repos["tiny-org/idefics3"] = {"main": {"config.json": config}}
        shown = online(["inspect", "tiny-org/idefics3", "--self-test", "-q"], hub.url, tmp_path)
        requests = list(hub.requests)
    assert shown.returncode == 0, shown.stderr
    from vlmguard_edit.kinds import KINDS

    # every kind but projector-shift (idefics3 has no projector output bias)
    assert f"idefics3: {len(KINDS) - 1} passed, 0 failed" in shown.stdout
    assert not [r for r in requests if "safetensors" in r], requests
