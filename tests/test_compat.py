"""A transformers release that breaks a family's forward gives one line naming both."""

import inspect
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers.models.llama import modeling_llama

from cli import main
from vlmguard_edit import compat

ROOT = Path(__file__).resolve().parents[1]


def test_tested_version_is_the_locked_one():
    lock = (ROOT / ".ci" / "constraints.txt").read_text("utf-8")
    assert f"transformers=={compat.TESTED_TRANSFORMERS}\n" in lock
    readme = (ROOT / "README.md").read_text("utf-8")
    assert f"transformers {compat.TESTED_TRANSFORMERS}" in readme


def broken_forward():
    """A forward that fails the way an upstream bug does: raised in transformers' own file."""
    source = "def forward(self, *args, **kwargs):\n    return kwargs['x'].image_outputs\n"
    namespace = {}
    exec(compile(source, inspect.getfile(modeling_llama), "exec"), namespace)
    return namespace["forward"]


def test_upstream_forward_bug_is_one_line(base_llm, tmp_path, monkeypatch):
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", broken_forward())
    monkeypatch.setattr(compat, "transformers_version", lambda: "9.9.9")
    out = tmp_path / "d.safetensors"
    result = CliRunner().invoke(main, ["direction", str(base_llm), "-o", str(out), "-q"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(r"transformers 9\.9\.9 failed to run the llama model \(KeyError", lines[0])
    assert f"transformers=={compat.TESTED_TRANSFORMERS}" in lines[0]
    assert not out.exists()


def test_our_own_errors_are_not_rewritten():
    with pytest.raises(KeyError), compat.forward_errors("llava"):
        {}["missing"]  # raised here, not in transformers: a bug of ours keeps its traceback
