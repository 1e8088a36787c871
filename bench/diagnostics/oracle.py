from common import *


def value_functionals(model, layer, v):
    """Per kv head: the value-space vectors c with r^T W_o^h v = c^T v for query heads on it."""
    cfg = model.config.text_config
    blk = text_layers(model)[layer]
    Wo = blk.self_attn.o_proj.weight  # (H, nh*hd)
    hd = cfg.head_dim
    nh = cfg.num_attention_heads
    nkv = cfg.num_key_value_heads
    r = v[0]
    per = {}
    for h in range(nh):
        c = Wo[:, h * hd : (h + 1) * hd].T @ r  # (hd)
        per.setdefault(h // (nh // nkv), []).append(c)
    return {
        k: torch.linalg.qr(torch.stack(cs, 1))[0] for k, cs in per.items()
    }  # orthonormal basis (hd, 2)


def oracle(layers, strength=1.0):
    @contextlib.contextmanager
    def ctx(model):
        cfg = model.config.text_config
        hd = cfg.head_dim
        with ImageMask(model) as im:
            hs = []
            for l in layers:
                Q = value_functionals(model, l, v1[l])

                def hook(_m, _a, out, Q=Q):
                    if im.mask is None or not im.mask.any() or out.shape[1] != im.mask.shape[1]:
                        return out
                    out = out.clone()
                    for k, B in Q.items():
                        seg = out[..., k * hd : (k + 1) * hd]
                        proj = (seg @ B) @ B.T
                        seg -= strength * proj * im.mask[..., None]
                    return out

                hs.append(text_layers(model)[l].self_attn.v_proj.register_forward_hook(hook))
            try:
                yield
            finally:
                for h in hs:
                    h.remove()

    return ctx


run("none")
run("oracle L0-3", hooks=oracle([0, 1, 2, 3]))
run("oracle L0", hooks=oracle([0]))
run("oracle L2-3", hooks=oracle([2, 3]))
run("oracle L0-3 x2 (flip)", hooks=oracle([0, 1, 2, 3], 2.0))
