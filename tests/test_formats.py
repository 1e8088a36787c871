"""Directions from other tools (--direction-format): each format's layer convention converted
to this project's (the output of block l), vectors orthonormalised in float32, provenance
recorded; bad files refused in one line with nothing written."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.direction import Direction
from vlmguard_edit.errors import DirectionError
from vlmguard_edit.formats import import_direction
from vlmguard_edit.recipes import Recipe

D, N = 64, 4  # the tiny VLM: hidden 64, 4 text layers


def unit(seed, d=D, dtype=torch.float32):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).to(dtype)


def refusal_direction(folder, layer=3, scale=7.0):
    torch.save(unit(0, dtype=torch.float64) * scale, folder / "direction.pt")  # not normalised
    (folder / "direction_metadata.json").write_text(json.dumps({"pos": -1, "layer": layer}))
    return folder / "direction.pt"


def test_refusal_direction_is_block_l_minus_1_everywhere_and_normalised(tmp_path):
    d = import_direction(refusal_direction(tmp_path), "refusal-direction", N, D)
    assert d.layers == [0, 1, 2, 3] and d.rank == 1
    assert torch.allclose(d.vectors[2][0], unit(0), atol=1e-6)  # unit, same orientation
    assert d.meta["imported_from"] == "refusal-direction"
    assert "output of block L-1" in d.meta["layer_convention"]
    assert d.meta["source_layers"]["0"] == "measured at their layer 3"
    with pytest.raises(DirectionError, match="measured at block -1's output"):
        import_direction(refusal_direction(tmp_path, layer=0), "refusal-direction", N, D)


def test_llm_abliteration_shifts_each_layer_down_by_one(tmp_path):
    path = tmp_path / "refusal.pt"
    saved = {f"refuse_{L}": unit(L) * 3 for L in (1, 2, 3)}
    saved["refusenorm_2"] = unit(99)  # the normalised one wins over refuse_2
    torch.save(saved, path)
    d = import_direction(path, "llm-abliteration", N, D)
    assert d.layers == [0, 1, 2]  # refuse_L is hidden_states[L] = block L-1's output
    assert torch.allclose(d.vectors[0][0], unit(1), atol=1e-6)
    assert torch.allclose(d.vectors[1][0], unit(99), atol=1e-6)
    assert d.meta["source_layers"] == {"0": "refuse_1", "1": "refusenorm_2", "2": "refuse_3"}
    torch.save({"refuse_5": unit(5)}, path)  # hidden_states[5] = block 4: this model has 0..3
    with pytest.raises(DirectionError, match=r"layer\(s\) \[4\].*0\.\.3"):
        import_direction(path, "llm-abliteration", N, D)


def test_an_fp16_unit_vector_passes_the_orthonormality_check(tmp_path):
    """sumandora: one [1, d] fp16 unit tensor at the input of block int(0.6 N)."""
    from vlmguard_edit.fold import check_orthonormal

    path = tmp_path / "refusal_direction.pt"
    torch.save(unit(3, dtype=torch.float16)[None, :], path)
    d = import_direction(path, "sumandora", N, D)
    assert d.meta["source_layers"]["3"] == f"measured at their layer {int(0.6 * N)}"
    for v in d.vectors.values():
        check_orthonormal(v, "imported")  # fp16 rounding removed in float32
        assert v.dtype == torch.float32
    # The native format too: a half-precision vector and a (d,) shape are accepted.
    native = tmp_path / "native.safetensors"
    Direction({0: unit(4)[None, :]}).save(native)
    from vlmguard_edit.checkpoint import save_with_provenance
    from vlmguard_edit.direction import DIRECTION_FORMAT

    half = {"layer.0": unit(4, dtype=torch.float16)}
    save_with_provenance(native, half, {"vlmguard.format": DIRECTION_FORMAT}, {})
    loaded = Direction.load(native)
    assert loaded.vectors[0].shape == (1, D)
    check_orthonormal(loaded.vectors[0], "native fp16")


def repeng_file(path, width=D, layers=(1, 2), arch="controlvector"):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(layers))
    for layer in layers:
        writer.add_tensor(f"direction.{layer}", unit(layer, width).numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_repeng_gguf_layers_are_block_outputs_and_width_is_checked(tmp_path):
    d = import_direction(repeng_file(tmp_path / "cv.gguf"), "repeng", N, D)
    assert d.layers == [1, 2] and torch.allclose(d.vectors[2][0], unit(2), atol=1e-6)
    with pytest.raises(DirectionError, match=r"hidden size is 64 .a direction for another model"):
        import_direction(repeng_file(tmp_path / "wide.gguf", width=96), "repeng", N, D)
    with pytest.raises(DirectionError, match="not a GGUF control vector"):
        import_direction(repeng_file(tmp_path / "m.gguf", arch="llama"), "repeng", N, D)


def test_bare_safetensors_takes_the_layer_from_the_key_and_warns(tmp_path, caplog):
    path = tmp_path / "dirs.safetensors"
    two = torch.stack([unit(7), unit(8) + unit(7)])  # not orthogonal: orthonormalised
    save_file({"layer_1": unit(6), "model.layers.3": two}, str(path))
    d = import_direction(path, "safetensors", N, D)
    assert d.layers == [1, 3] and d.vectors[1].shape == (1, D) and d.vectors[3].shape == (2, D)
    gram = d.vectors[3].double() @ d.vectors[3].double().T
    assert torch.allclose(gram, torch.eye(2, dtype=torch.float64), atol=1e-6)
    assert "no provenance" in caplog.text


def test_a_pickled_object_is_refused_and_nothing_is_written(vlm_factory, tmp_path):
    path = tmp_path / "direction.pt"
    torch.save({"refuse_1": unit(1), "payload": Recipe()}, path)  # a pickled object inside
    (tmp_path / "direction_metadata.json").write_text('{"pos": -1, "layer": 2}')
    out = tmp_path / "guarded"
    recipe = Recipe(layers=[1, 3], rank=1)
    opts = ConvertOptions(str(vlm_factory()), out, recipe, direction_file=path, progress=False)
    for fmt in ("llm-abliteration", "refusal-direction"):
        with pytest.raises(DirectionError, match="never unpickles objects"):
            convert(ConvertOptions(**{**opts.__dict__, "direction_format": fmt}))
        assert not out.exists()


def test_convert_folds_an_imported_direction_and_records_where_it_came_from(vlm_factory, tmp_path):
    src, out = vlm_factory(), tmp_path / "guarded"
    path = repeng_file(tmp_path / "cv.gguf", layers=(1, 3))
    opts = ConvertOptions(
        str(src),
        out,
        Recipe(layers=[1, 3], rank=1),
        direction_file=path,
        direction_format="repeng",
        progress=False,
    )
    result = convert(opts)
    record = json.loads((out / "vlmguard.json").read_text())
    assert record["direction"]["imported_from"] == "repeng"
    assert "--direction-format repeng" in record["command"]
    shipped = Direction.load(out / "vlmguard_direction.safetensors")
    assert torch.allclose(shipped.vectors[3][0], unit(3), atol=1e-6)
    assert len(result.plan.edits) == 4
    assert "imported from a repeng file" in (out / "README.md").read_text()
