import sys, time, torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import organism_search as S
from vlmguard_edit import evaluate as ev, images as imgs
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.runtime import text_layers
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.manual_seed(0)
O = S.ORGANISM
anchors = load_anchors(O / "anchors.jsonl")


def states(subject, prompts, image):
    layers = text_layers(subject.model)
    out = {i: [] for i in range(len(layers))}
    hs = []
    for i, l in enumerate(layers):
        hs.append(
            l.register_forward_hook(
                lambda m, a, o, i=i: out[i].append(
                    (o[0] if isinstance(o, tuple) else o)[:, -1].detach()
                )
            )
        )
    with torch.no_grad():
        for s in range(0, len(prompts), 32):
            chunk = prompts[s : s + 32]
            subject.model(**subject.inputs(chunk, [image() if image else None for _ in chunk]))
    for h in hs:
        h.remove()
    return {i: torch.cat(v) for i, v in out.items()}


sub = ev.Subject(O / "vlm", "cpu", "auto")
harm = list(anchors.harmful)
benign = list(anchors.harmless)
t0 = time.time()
ht = states(sub, harm, None)
hb = states(sub, harm, imgs.blank)
bt = states(sub, benign, None)
bb = states(sub, benign, imgs.blank)
print("states", time.time() - t0)
for l in range(4):
    d = hb[l] - ht[l]
    sv = torch.linalg.svdvals(d)
    mean = d.mean(0)
    r = (ht[l] - bt[l]).mean(0)
    rn = r / r.norm()
    print(
        l,
        "gap sv",
        [round(x, 2) for x in sv[:6].tolist()],
        "|mean|",
        round(mean.norm().item(), 2),
        "cos(mean gap, refusal)",
        round((mean / mean.norm() @ rn).item(), 3),
        "proj on r: text harm",
        round((ht[l] @ rn).mean().item(), 2),
        "img harm",
        round((hb[l] @ rn).mean().item(), 2),
        "text benign",
        round((bt[l] @ rn).mean().item(), 2),
        "img benign",
        round((bb[l] @ rn).mean().item(), 2),
    )
