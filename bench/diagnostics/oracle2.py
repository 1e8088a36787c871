from common import *


def zero_values(layers, scale=0.0):
    @contextlib.contextmanager
    def ctx(model):
        with ImageMask(model) as im:
            hs = []
            for l in layers:

                def hook(_m, _a, out):
                    if im.mask is None or not im.mask.any() or out.shape[1] != im.mask.shape[1]:
                        return out
                    return out * torch.where(im.mask[..., None], scale, 1.0)

                hs.append(text_layers(model)[l].self_attn.v_proj.register_forward_hook(hook))
            try:
                yield
            finally:
                for h in hs:
                    h.remove()

    return ctx


run("zero image values L0-3", hooks=zero_values(range(4)), captions=False)
run("zero image values L0", hooks=zero_values([0]), captions=False)
run("zero image values L1-3", hooks=zero_values([1, 2, 3]), captions=False)
run("half image values L0-3", hooks=zero_values(range(4), 0.5))
