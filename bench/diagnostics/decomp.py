from common import *

model = original.model
harm = list(anchors.harmful)
ben = list(anchors.harmless)


def capture(prompts, image):
    out = {}
    hs = []
    for l, blk in enumerate(text_layers(model)):
        for name, mod in (("attn", blk.self_attn.o_proj), ("mlp", blk.mlp.down_proj)):
            hs.append(
                mod.register_forward_hook(
                    lambda m, a, o, k=(l, name): out.setdefault(k, []).append(o[:, -1].detach())
                )
            )
    emb = model.get_input_embeddings()
    with torch.no_grad():
        for s in range(0, len(prompts), 32):
            chunk = prompts[s : s + 32]
            original.model(**original.inputs(chunk, [image() if image else None for _ in chunk]))
    for h in hs:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


for label, prompts in (("harmful", harm), ("benign", ben)):
    t = capture(prompts, None)
    b = capture(prompts, imgs.blank)
    print(label)
    for l in range(4):
        for name in ("attn", "mlp"):
            r = v1[l][0]  # note: using layer-l direction
            r3 = v1[3][0]
            print(
                f"  L{l} {name}: text {(t[(l, name)] @ r3).mean():7.2f} image {(b[(l, name)] @ r3).mean():7.2f}   (on r3)"
            )
