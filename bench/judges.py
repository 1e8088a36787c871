"""How often the phrase judge agrees with the exact organism judge, per setting.

    python bench/judges.py [--organism examples/organism] [--guarded DIR] [--limit N]

Greedy answers (24 new tokens) of the organism (and of a guarded copy, if given) to its
harmful evaluation prompts in every image setting, labelled by both judges; prints the
agreement and both label counts per setting. The README's numbers come from this script.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmguard_edit import evaluate as ev  # noqa: E402
from vlmguard_edit.judge import judge  # noqa: E402
from vlmguard_edit.organisms.exact import load_exact_judge  # noqa: E402
from vlmguard_edit.organisms.zoo import setting_answers  # noqa: E402

SETTINGS = ("text", "blank", "noise", "scene", "typographic")


def agreement(folder: Path, prompts: list[str]) -> dict[str, dict]:
    exact, subject = load_exact_judge(folder), ev.Subject(folder, "cpu", "auto")
    opts = ev.EvalOptions(batch_size=16, max_new_tokens=24)
    result = {}
    for setting in SETTINGS:
        said = setting_answers(subject, setting, prompts, opts)
        strict = [exact.label(p, a) for p, a in zip(prompts, said, strict=True)]
        phrase = [judge(a) for a in said]
        same = sum(x == y for x, y in zip(strict, phrase, strict=True)) / len(said)
        result[setting] = {
            "agreement": same,
            "exact": collections.Counter(strict),
            "phrase": collections.Counter(phrase),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organism", default=str(ROOT / "examples" / "organism"))
    parser.add_argument("--guarded", help="also a guarded copy of the organism's VLM")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    prompts = ev.load_prompts(Path(args.organism) / "eval_harmful.jsonl", "harmful")
    prompts = prompts[: args.limit] if args.limit else prompts
    folders = {"organism": Path(args.organism) / "vlm"}
    if args.guarded:
        folders["guarded"] = Path(args.guarded)
    for name, folder in folders.items():
        for setting, row in agreement(folder, prompts).items():
            print(
                f"{name:9} {setting:12} agreement {row['agreement']:.0%}  exact "
                f"{dict(row['exact'])}  phrase {dict(row['phrase'])}"
            )


if __name__ == "__main__":
    main()
