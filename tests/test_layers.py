import math

import pytest
import torch
import torch.nn.functional as F

from mae_vit.layers import Attention, PatchEmbed, resize_pos_embed, sincos_1d, sincos_2d


def test_sincos_1d_known_values():
    emb = sincos_1d(4, torch.tensor([0.0, 1.0, 2.0]))
    # omega = 1 / 10000 ** ([0, 1] / 2) = [1, 0.01]
    expected = torch.tensor([
        [0, 0, 1, 1],
        [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
        [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)],
    ], dtype=torch.float64)
    torch.testing.assert_close(emb, expected)


def test_sincos_2d_matches_official_layout():
    # 2 x 3 grid, D = 8: first half from the column (w) index, second half from the row (h) index
    emb = sincos_2d(8, (2, 3), cls_token=True)
    assert emb.shape == (1 + 6, 8) and emb.dtype == torch.float32
    assert torch.all(emb[0] == 0)
    omega = [1.0, 0.01]
    for r in range(2):
        for c in range(3):
            row = emb[1 + r * 3 + c]
            expect = [math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
            expect += [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega]
            torch.testing.assert_close(row, torch.tensor(expect, dtype=torch.float32))


def test_patch_embed_is_linear_projection_of_flattened_patches():
    pe = PatchEmbed((8, 12), 4, 3, 5)
    x = torch.randn(2, 3, 8, 12)
    out = pe(x)
    assert out.shape == (2, 6, 5) and pe.grid_size == (2, 3)
    # token of patch (row 1, col 2) = W @ flatten(patch) + b
    patch = x[:, :, 4:8, 8:12].reshape(2, -1)
    expect = patch @ pe.proj.weight.reshape(5, -1).T + pe.proj.bias
    torch.testing.assert_close(out[:, 1 * 3 + 2], expect)
    with pytest.raises(ValueError, match="not divisible"):
        PatchEmbed(10, 4, 3, 5)


def test_fused_and_eager_attention_agree():
    attn = Attention(32, 4)
    x = torch.randn(2, 7, 32)
    fused = attn(x)
    eager, weights = attn(x, return_attention=True)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))


def _cubic_weights(t, a=-0.75):
    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0
    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _resize_1d_reference(values, out_len):
    """Keys cubic convolution (a = -0.75), half-pixel centres, clamped borders: PyTorch's bicubic."""
    n = len(values)
    out = []
    for i in range(out_len):
        src = (i + 0.5) * n / out_len - 0.5
        x0 = math.floor(src)
        w = _cubic_weights(src - x0)
        out.append(sum(w[j] * values[min(max(x0 - 1 + j, 0), n - 1)] for j in range(4)))
    return out


def test_resize_pos_embed_identity_shapes_and_bicubic_values():
    pos = torch.randn(1, 1 + 3 * 4, 6)
    assert resize_pos_embed(pos, (3, 4), old_grid=(3, 4)) is pos
    out = resize_pos_embed(pos, (5, 7), old_grid=(3, 4))
    assert out.shape == (1, 1 + 35, 6)
    torch.testing.assert_close(out[:, 0], pos[:, 0])  # class token kept
    # separable reference: along columns, then along rows, channel 0
    grid = pos[0, 1:, 0].reshape(3, 4).tolist()
    cols = [_resize_1d_reference(r, 7) for r in grid]  # 3 x 7
    ref = [_resize_1d_reference([cols[r][c] for r in range(3)], 5) for c in range(7)]  # 7 x 5
    ref = torch.tensor(ref).T  # 5 x 7
    torch.testing.assert_close(out[0, 1:, 0].reshape(5, 7), ref, rtol=1e-5, atol=1e-5)
    # PyTorch's antialiased bicubic is a different filter (what timm uses): must not be what we do
    g = pos[:, 1:].reshape(1, 3, 4, 6).permute(0, 3, 1, 2)
    aa = F.interpolate(g, size=(5, 7), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(aa.permute(0, 2, 3, 1).reshape(1, 35, 6), out[:, 1:])


def test_resize_infers_square_grid():
    pos = torch.randn(1, 1 + 16, 4)
    assert resize_pos_embed(pos, (6, 6)).shape == (1, 37, 4)
