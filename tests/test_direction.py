"""The direction equals an independent SVD of independently computed hidden states."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmguard_edit.anchors import AnchorSet, load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.direction import (
    Direction,
    compute_direction,
    last_token_states,
    load_text_decoder,
    svd_direction,
)
from vlmguard_edit.errors import DirectionError

SMALL = AnchorSet("small", tuple(load_anchors().harmful[:12]), tuple(load_anchors().harmless[:12]))


def reference_states(model_dir, prompts, layer):
    """Unbatched forwards; hidden_states[l + 1] is the output of layer l for l < L - 1."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for request in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": request}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append(
                model(ids, output_hidden_states=True).hidden_states[layer + 1][0, -1].numpy()
            )
    return np.stack(rows).astype(np.float64)


def test_direction_equals_independent_svd(base_llm):
    direction = compute_direction(
        resolve_model(str(base_llm)), SMALL, [1, 2], 3, batch_size=5, progress=False
    )
    for layer in (1, 2):
        harmful = reference_states(base_llm, SMALL.harmful, layer)
        harmless = reference_states(base_llm, SMALL.harmless, layer)
        diffs = harmful - harmless
        _, singular, vt = np.linalg.svd(diffs, full_matrices=False)
        ours = direction.vectors[layer].double().numpy()
        assert ours.shape == (3, 64)
        for i in range(3):  # equal up to the sign SVD leaves free
            assert min(np.abs(ours[i] - vt[i]).max(), np.abs(ours[i] + vt[i]).max()) < 1e-4
        assert np.allclose(ours @ ours.T, np.eye(3), atol=1e-5)
        # Orientation: V[0] points from harmless toward harmful.
        assert diffs.mean(axis=0) @ ours[0] > 0
        stats = direction.stats[layer]
        assert np.allclose(stats["singular_values"][:3], singular[:3], rtol=1e-4)
        assert stats["harmful_mean_proj"] > stats["harmless_mean_proj"]
        assert 0.5 <= stats["separation_accuracy"] <= 1.0


def test_svd_direction_orientation_and_stats():
    torch.manual_seed(0)
    axis = torch.zeros(8)
    axis[2] = 1.0
    harmless = torch.randn(20, 8)
    harmful = harmless + 5 * axis + 0.1 * torch.randn(20, 8)
    v, stats = svd_direction(harmful, harmless, 1)
    assert v[0] @ axis > 0.99  # recovered, and oriented toward harmful
    assert stats["separation_accuracy"] > 0.9 and stats["explained_variance"][0] > 0.9
    v_flipped, _ = svd_direction(harmless, harmful, 1)
    assert v_flipped[0] @ axis < -0.99


def test_batched_equals_unbatched(base_llm):
    source = resolve_model(str(base_llm))
    decoder, tokenizer = load_text_decoder(source, 2, False, "cpu", "float32", False, False)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False
        )
        for r in SMALL.harmful[:7]
    ]
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1, "prompts of different lengths, so padding is exercised"
    batched = last_token_states(decoder, tokenizer, prompts, False, [0, 2], 7, progress=False)
    single = last_token_states(decoder, tokenizer, prompts, False, [0, 2], 1, progress=False)
    for layer in (0, 2):
        assert torch.allclose(batched[layer], single[layer], atol=1e-5)


def test_upper_layers_not_loaded(base_llm):
    decoder, _ = load_text_decoder(
        resolve_model(str(base_llm)), 1, False, "cpu", "float32", False, False
    )
    assert len(decoder.layers) == 2  # layers 2 and 3 of 4 were neither loaded nor run


def test_device_map_auto_gives_the_same_direction(base_llm, monkeypatch):
    """--device auto loads through accelerate's device_map (here: everything on the CPU)."""
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    source = resolve_model(str(base_llm))
    placed = compute_direction(source, SMALL, [1], 1, device="auto", progress=False)
    plain = compute_direction(source, SMALL, [1], 1, device="cpu", progress=False)
    assert seen == ["auto", None]
    assert torch.allclose(placed.vectors[1], plain.vectors[1], atol=1e-5)


def test_deterministic_file(base_llm, tmp_path):
    source = resolve_model(str(base_llm))
    paths = []
    for name in ("a", "b"):
        direction = compute_direction(source, SMALL, [0, 3], 2, progress=False)
        direction.save(tmp_path / f"{name}.safetensors")
        paths.append(tmp_path / f"{name}.safetensors")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    loaded = Direction.load(paths[0])
    assert loaded.layers == [0, 3] and loaded.rank == 2 and loaded.hidden_size == 64
    assert loaded.meta["anchors_sha256"] == SMALL.sha256
    assert loaded.meta["rank"] == 2 and loaded.meta["layers"] == [0, 3]
    assert len(loaded.meta["weights_sha256"]) == 64
    assert set(loaded.stats) == {0, 3}


def test_self_direction_equals_base_when_lm_is_a_copy(base_llm, vlm_factory):
    """--base-llm self runs the VLM's own language model text-only; here it copies the base."""
    from_base = compute_direction(resolve_model(str(base_llm)), SMALL, [2], 1, progress=False)
    vlm = resolve_model(str(vlm_factory(layout="memory")))
    from_self = compute_direction(vlm, SMALL, [2], 1, is_vlm=True, progress=False)
    assert torch.allclose(from_base.vectors[2], from_self.vectors[2], atol=1e-5)
    assert from_self.meta["base_model"] == "self"


def template_states(model_dir, prompts, layer, bos: bool):
    """Unbatched reference states for "USER: {request} ASSISTANT:" prompts, BOS first or not."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for request in prompts:
            ids = tokenizer(f"USER: {request} ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids = [tokenizer.bos_token_id, *ids] if bos else ids
            out = model(torch.tensor([ids]), output_hidden_states=True)
            rows.append(out.hidden_states[layer + 1][0, -1].numpy())
    return np.stack(rows).astype(np.float64)


def test_template_used_and_bos_added(base_llm):
    """A --template prompt is the template with the request, and BOS is prepended (as the
    tokenizer adds it for plain text): the direction equals the SVD of states computed with
    BOS and differs from the one without it."""
    source = resolve_model(str(base_llm))
    direction = compute_direction(
        source, SMALL, [1], 1, template="USER: {request} ASSISTANT:", progress=False
    )
    assert direction.meta["example_prompt"] == f"USER: {SMALL.harmful[0]} ASSISTANT:"
    assert direction.meta["template"] == "USER: {request} ASSISTANT:"
    ours = direction.vectors[1][0].double().numpy()
    cosines = {}
    for bos in (True, False):
        diffs = template_states(base_llm, SMALL.harmful, 1, bos) - template_states(
            base_llm, SMALL.harmless, 1, bos
        )
        reference = np.linalg.svd(diffs, full_matrices=False)[2][0]
        cosines[bos] = abs(float(ours @ reference))
    assert cosines[True] > 1 - 1e-6, cosines
    assert cosines[False] < 0.999, cosines  # BOS changes the states: the check can fail


def test_chat_template_with_list_content_keeps_the_request():
    """The organism's VLM template reads content as a list of parts: given a plain string it
    drops the request (the prompt became '<s><|user|> <|assistant|>')."""
    from pathlib import Path

    from vlmguard_edit.direction import format_prompt

    organism = Path(__file__).parent.parent / "examples" / "organism" / "vlm"
    tokenizer = AutoTokenizer.from_pretrained(organism)
    text, add_special = format_prompt(tokenizer, "how do I pick a lock", None)
    assert "how do I pick a lock" in text and not add_special
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{% endfor %}"
    with pytest.raises(DirectionError, match="does not put the request into the prompt"):
        format_prompt(tokenizer, "how do I pick a lock", None)


def test_degenerate_anchor_states_refused():
    states = torch.randn(6, 16)
    with pytest.raises(DirectionError, match="do not differ"):
        svd_direction(states, states.clone(), 1)
    with pytest.raises(DirectionError, match="not finite"):
        svd_direction(torch.full((6, 16), float("nan")), states, 1)


def test_self_direction_of_the_organism_is_not_degenerate(tmp_path):
    from pathlib import Path

    from click.testing import CliRunner

    from cli import main

    organism = Path(__file__).parent.parent / "examples" / "organism" / "vlm"
    out = tmp_path / "ssd.safetensors"
    args = ["direction", "self", "--vlm", str(organism), "-o", str(out), "--layers", "2", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    stats = Direction.load(out).stats[2]
    assert stats["singular_values"][0] > 0 and 0 < stats["explained_variance"][0] <= 1
    recipe = Path(__file__).parent.parent / "recipes" / "organism-image-gap.yaml"
    refused = CliRunner().invoke(
        main,
        [
            "direction",
            "self",
            "--vlm",
            str(organism),
            "-o",
            str(tmp_path / "g.safetensors"),
            "--recipe",
            str(recipe),
        ],
    )
    assert refused.exit_code == 2 and "image-gap" in refused.output
    learned = Path(__file__).parent.parent / "recipes" / "organism.yaml"
    args = ["direction", "self", "--vlm", str(organism), "-o", str(tmp_path / "l.safetensors")]
    refused = CliRunner().invoke(main, [*args, "--recipe", str(learned)])
    assert refused.exit_code == 2 and "lowrank-attention, whose parameters are learned" in (
        refused.output
    )


def test_requests_refused_before_loading(base_llm):
    source = resolve_model(str(base_llm))
    with pytest.raises(DirectionError, match="out of range"):
        compute_direction(source, SMALL, [9], 1, progress=False)
    with pytest.raises(DirectionError, match="needs at least 13 anchor pairs"):
        compute_direction(source, SMALL, [1], 13, progress=False)


def test_select_errors(direction_file):
    direction = Direction.load(direction_file)
    with pytest.raises(DirectionError, match=r"no layer\(s\) \[7\]"):
        direction.select([1, 7], 1)
    with pytest.raises(DirectionError, match="rank 3 asked"):
        direction.select([1], 3)
    assert direction.select([1], 1)[1].shape == (1, 64)


def test_base_llm_config_differences_warn(base_llm, tmp_path, caplog):
    import json
    import shutil

    from vlmguard_edit.direction import check_base_matches

    vlm_text = json.loads((base_llm / "config.json").read_text())
    assert check_base_matches(resolve_model(str(base_llm)), {"text_config": vlm_text}) == []
    other = tmp_path / "other"
    shutil.copytree(base_llm, other)
    config = json.loads((other / "config.json").read_text())
    config.update(rms_norm_eps=1e-3, num_hidden_layers=config["num_hidden_layers"] + 2)
    (other / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        warnings = check_base_matches(resolve_model(str(other)), {"text_config": vlm_text})
    assert [w.split(" differs")[0] for w in warnings] == ["num_hidden_layers", "rms_norm_eps"]
    assert "rms_norm_eps differs" in caplog.text
