"""Load the guarded checkpoints of make_fixtures.py with plain transformers (any release,
e.g. 4.57) and check: no missing or unexpected keys, and the same logits as the release that
wrote them. Needs only torch, transformers and safetensors (no vlmguard_edit).

    python tests/compat/check_load.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText


def check(case: Path) -> float:
    model, info = AutoModelForImageTextToText.from_pretrained(
        case / "guarded", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise SystemExit(f"{case.name}: loading reported {problems}")
    expected = load_file(case / "expected.safetensors")
    logits, original = expected.pop("logits"), expected.pop("original_logits")
    with torch.no_grad():
        got = model.eval()(**expected).logits
    gap = (got - logits).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"{case.name}: logits differ by {gap:.2e} from the writing release")
    if (got - original).abs().max().item() < 1e-3:
        raise SystemExit(f"{case.name}: the guarded model behaves like the original")
    return gap


def main(out: Path) -> None:
    cases = sorted(p.parent for p in out.glob("*/expected.safetensors"))
    if not cases:
        raise SystemExit(f"no fixtures under {out}")
    for case in cases:
        gap = check(case)
        print(
            f"transformers {transformers.__version__}: {case.name} loads, max |dlogits| {gap:.1e}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
