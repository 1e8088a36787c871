"""The pure math: M = I + beta V^T V, float32 inside, dtype kept, non-finite refused."""

import pytest
import torch

from vlmguard_edit.errors import PlanError
from vlmguard_edit.fold import apply_map, check_orthonormal, map_hidden


def orthonormal(m: int, d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()  # (m, d)


@pytest.mark.parametrize("beta", [-1.0, 0.5, 3.0])
@pytest.mark.parametrize("rank", [1, 3])
def test_apply_map_equals_explicit_matrix(beta, rank):
    v = orthonormal(rank, 16)
    w = torch.randn(16, 24)
    explicit = (torch.eye(16, dtype=torch.float64) + beta * v.double().T @ v.double()) @ w.double()
    assert torch.allclose(apply_map(w, v, beta).double(), explicit, atol=1e-5)
    assert not torch.allclose(apply_map(w, v, beta), w, atol=1e-3)  # it did something


def test_projection_removes_direction_and_is_idempotent():
    v = orthonormal(2, 16)
    w = torch.randn(16, 8)
    projected = apply_map(w, v, -1.0)
    assert (v @ projected).abs().max() < 1e-5
    assert torch.allclose(apply_map(projected, v, -1.0), projected, atol=1e-6)


def test_bias_and_dtype_kept():
    v = orthonormal(1, 16)
    bias = torch.randn(16, dtype=torch.bfloat16)
    out = apply_map(bias, v, -1.0)
    assert out.dtype == torch.bfloat16 and out.shape == bias.shape
    expected = bias.float() - v[0] * (v[0] @ bias.float())
    assert torch.allclose(out.float(), expected, atol=2e-2)


def test_map_hidden_matches_apply_map_on_writer_output():
    v = orthonormal(2, 16)
    w = torch.randn(16, 8)
    x = torch.randn(5, 8)
    folded = x @ apply_map(w, v, 2.0).T  # F.linear with the folded weight
    hooked = map_hidden(x @ w.T, v, 2.0)
    assert torch.allclose(folded, hooked, atol=1e-5)


def test_non_finite_refused():
    v = orthonormal(1, 4)
    with pytest.raises(PlanError, match="non-finite"):
        apply_map(torch.full((4, 2), float("inf")), v, -1.0)


def test_check_orthonormal():
    check_orthonormal(orthonormal(3, 8), "ok")
    with pytest.raises(PlanError, match="not orthonormal"):
        check_orthonormal(2 * orthonormal(1, 8), "layer 4")


def test_attention_direction_maximises_the_read_out():
    """u maximises (read-out along v) over unit states: no random unit state does better."""
    from vlmguard_edit.fold import attention_direction

    g = torch.Generator().manual_seed(0)
    d, heads, kv, hd = 16, 4, 2, 4
    wo, wv = torch.randn(d, heads * hd, generator=g), torch.randn(kv * hd, d, generator=g)
    gain, v = (
        torch.rand(d, generator=g) + 0.5,
        torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0),
    )

    def read_out(h):  # Σ_h v . W_o^h W_v^h (g ⊙ h)
        total = 0.0
        for head in range(heads):
            k = head // (heads // kv)
            total += v @ wo[:, head * hd : (head + 1) * hd] @ wv[k * hd : (k + 1) * hd] @ (gain * h)
        return total

    u = attention_direction(wo, wv, gain, v, heads, kv)
    assert abs(u.norm() - 1) < 1e-5
    best = read_out(u)
    others = torch.nn.functional.normalize(torch.randn(200, d, generator=g), dim=1)
    assert best > 0 and all(read_out(o) <= best + 1e-5 for o in others)


def test_shift():
    from vlmguard_edit.fold import shift

    b = torch.zeros(4, dtype=torch.bfloat16)
    out = shift(b, torch.tensor([1.0, 0, 0, 0]), 2.0)
    assert out.dtype == torch.bfloat16 and out.tolist() == [2.0, 0, 0, 0]
    with pytest.raises(PlanError, match="non-finite"):
        shift(b, torch.tensor([float("nan"), 0, 0, 0]), 1.0)
