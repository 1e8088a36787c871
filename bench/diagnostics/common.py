import sys, time, contextlib, torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import organism_search as S
from vlmguard_edit import evaluate as ev, images as imgs
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.direction import compute_direction
from vlmguard_edit.runtime import text_layers
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.manual_seed(0)
O = S.ORGANISM
anchors = load_anchors(O / "anchors.jsonl")
direction = compute_direction(
    resolve_model(str(O / "llm")), anchors, [0, 1, 2, 3], 2, progress=False
)
v1 = direction.select([0, 1, 2, 3], 1)
original = ev.Subject(O / "vlm", "cpu", "auto")
IMG = original.model.config.image_token_id


def opts(limit=48, settings=("text", "blank", "typographic", "noise")):
    return ev.EvalOptions(
        settings=settings,
        harmful=ev.load_prompts(O / "eval_harmful.jsonl", "harmful")[:limit],
        benign=ev.load_prompts(O / "eval_benign.jsonl", "benign")[:limit],
        max_new_tokens=24,
        batch_size=16,
        progress=False,
    )


def run(
    name,
    edit=None,
    hooks=None,
    limit=48,
    settings=("text", "blank", "typographic", "noise"),
    captions=True,
):
    t = time.time()
    subject = ev.Subject(O / "vlm", "cpu", "auto")
    if edit is not None:
        with torch.no_grad():
            edit(subject.model)
    subject.hooks = hooks
    report = ev.run_eval({"model": subject}, original, opts(limit, settings))
    m = report["systems"]["model"]["settings"]
    cap = S.caption_accuracy(subject) if captions else float("nan")
    cells = "  ".join(
        f"{s[:5]} {m[s]['harmful_refusal']:.2f}/{m[s]['benign_compliance']:.2f}/{m[s]['kl']:.3f}"
        for s in settings
    )
    print(f"{name:40s} {cells}  cap {cap:.2f}  ({time.time() - t:.0f}s)", flush=True)
    return m, cap


class ImageMask:
    """Track which positions are image tokens in the current forward."""

    def __init__(self, model):
        self.model = model
        self.mask = None

    def __enter__(self):
        def pre(_m, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            self.mask = (ids == IMG) if ids is not None else None

        self.h = self.model.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *e):
        self.h.remove()
