"""Tests for mae_vit.viz: attention distance, embedding PCA / similarity, MAE reconstructions, figure files."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mae_vit.errors import ConfigError
from mae_vit.files import write_json
from mae_vit.models import MaskedAutoencoderViT, ViTClassifier
from mae_vit.viz import (
    attention_distance,
    cls_attention_maps,
    mean_attention_distance,
    patch_embedding_components,
    position_embedding_similarity,
    position_similarity_stats,
    reconstruction_caption,
    reconstruction_grid,
    reconstruction_panels,
    save_png,
    write_all_figures,
)
from mae_vit.viz.embeddings import grid_distances

TINY = dict(embed_dim=32, depth=2, num_heads=2)
MAE_DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
MEAN3, STD3 = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def tiny_mae(img_size=16, in_chans=3, norm_pix_loss=False, seed=0):
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(
        img_size=img_size, patch_size=4, in_chans=in_chans, norm_pix_loss=norm_pix_loss, **TINY, **MAE_DECODER
    )


def tiny_classifier(img_size=16, in_chans=3, seed=0, **kw):
    torch.manual_seed(seed)
    return ViTClassifier(img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=5, **TINY, **kw)


def images(b=3, c=3, size=16, seed=1):
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def _pixel_distance_loop(grid, p, qi, qj, ki, kj):
    del grid
    return p * math.hypot(qi - ki, qj - kj)


# ---------------------------------------------------------------- attention distance (pure function)


def test_attention_all_on_self_has_zero_distance():
    n = 3 * 4
    attn = torch.eye(1 + n).expand(2, 3, -1, -1)  # (B=2, heads=3, 1+N, 1+N)
    assert torch.equal(attention_distance(attn, (3, 4), 8), torch.zeros(3))


def test_uniform_attention_gives_mean_pairwise_distance_of_grid():
    gh, gw, p = 3, 4, 8
    cells = list(itertools.product(range(gh), range(gw)))
    expected = sum(_pixel_distance_loop(None, p, *q, *k) for q in cells for k in cells) / len(cells) ** 2
    n = gh * gw
    uniform = torch.full((1, 2, 1 + n, 1 + n), 1.0 / (1 + n))  # also puts weight on the class token...
    got = attention_distance(uniform, (gh, gw), p)
    # ...which is dropped and the rest renormalised, so this is uniform over the patches.
    assert got.tolist() == pytest.approx([expected, expected], rel=1e-6)


def test_attention_distance_separates_heads_and_averages_images():
    gh, gw, p = 2, 3, 4
    n = gh * gw
    cells = list(itertools.product(range(gh), range(gw)))
    attn = torch.zeros(2, 2, n, n)  # no class token (T = N is accepted too)
    attn[:, 0] = torch.eye(n)  # head 0: self, distance 0
    attn[0, 1, :, 0] = 1.0  # image 0, head 1: every query looks at patch (0, 0)
    attn[1, 1, :, n - 1] = 1.0  # image 1, head 1: every query looks at the last patch
    to_first = sum(_pixel_distance_loop(None, p, *q, *cells[0]) for q in cells) / n
    to_last = sum(_pixel_distance_loop(None, p, *q, *cells[-1]) for q in cells) / n
    got = attention_distance(attn, (gh, gw), p)
    assert got.tolist() == pytest.approx([0.0, (to_first + to_last) / 2], rel=1e-6)


def test_attention_distance_rejects_token_count_that_does_not_fit_grid():
    with pytest.raises(ValueError):
        attention_distance(torch.ones(1, 1, 7, 7), (2, 2), 4)


def test_mean_attention_distance_on_model_shape_and_range():
    model = tiny_classifier(img_size=16)
    model.train()
    dist = mean_attention_distance(model, images())
    assert dist.shape == (2, 2)  # (depth, heads)
    max_dist = 4 * math.hypot(3, 3)
    assert bool(((dist > 0) & (dist < max_dist)).all())
    assert model.training  # mode restored


def test_mean_attention_distance_does_not_depend_on_batching():
    model, imgs = tiny_classifier(), images(b=5)
    one_pass = mean_attention_distance(model, imgs, batch_size=8)
    torch.testing.assert_close(mean_attention_distance(model, imgs, batch_size=2), one_pass)
    per_image = torch.stack([mean_attention_distance(model, imgs[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(per_image.mean(dim=0), one_pass)


def test_cls_attention_maps_are_normalised_grids():
    maps = cls_attention_maps(tiny_classifier(), images(b=2))
    assert maps.shape == (2, 4, 4)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2))


# ---------------------------------------------------------------- embeddings


def test_patch_embedding_components_are_orthonormal_and_ordered():
    model = tiny_mae()
    comps, explained = patch_embedding_components(model, n=10)
    assert comps.shape == (10, 3, 4, 4)
    flat = comps.reshape(10, -1).double()
    torch.testing.assert_close(flat @ flat.T, torch.eye(10, dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool((explained[:-1] >= explained[1:]).all())
    assert 0 < float(explained.sum()) <= 1 + 1e-6


def test_patch_embedding_pca_recovers_a_planted_direction():
    model = tiny_mae()
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(48, generator=g)
    direction /= direction.norm()
    coeffs = torch.randn(32, generator=g) * 10
    offset = torch.randn(48, generator=g)  # a common mean filter, removed by centring
    weights = offset + coeffs[:, None] * direction + 1e-3 * torch.randn(32, 48, generator=g)
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(weights.reshape(32, 3, 4, 4))
    comps, explained = patch_embedding_components(model, n=3)
    assert abs(float(comps[0].flatten() @ direction)) == pytest.approx(1.0, abs=1e-5)
    assert float(explained[0]) > 0.999
    assert float(comps[0].flatten()[comps[0].flatten().abs().argmax()]) > 0  # sign convention


def test_position_similarity_diagonal_is_one_and_symmetric():
    model = tiny_classifier(img_size=16, pos_embed="learned")
    sim = position_embedding_similarity(model)
    assert sim.shape == (4, 4, 4, 4)
    flat = sim.reshape(16, 16)
    torch.testing.assert_close(torch.diagonal(flat), torch.ones(16))
    torch.testing.assert_close(flat, flat.T)


def test_position_similarity_stats_on_hand_made_similarity():
    gh, gw = 4, 5
    cells = list(itertools.product(range(gh), range(gw)))
    sim = (1 - grid_distances((gh, gw)) / 10).reshape(gh, gw, gh, gw)
    far = [1 - math.dist(a, b) / 10 for a in cells for b in cells if math.dist(a, b) >= 2.5]
    stats = position_similarity_stats(sim)
    assert stats["neighbour_mean"] == pytest.approx(0.9)
    assert stats["far_mean"] == pytest.approx(sum(far) / len(far))
    assert position_similarity_stats(torch.ones(1, 1, 1, 1)) == {"neighbour_mean": None, "far_mean": None}


# ---------------------------------------------------------------- reconstructions


def _fixed_noise(b, n, seed=5):
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed))


def test_reconstruction_grid_shape_and_visible_patches_pasted_exactly():
    model, imgs = tiny_mae(img_size=16), images(b=3)
    noise = _fixed_noise(3, 16)
    grid = reconstruction_grid(model, imgs, mask_ratio=0.75, mean=MEAN3, std=STD3, noise=noise)
    assert grid.shape == (3, 3 * 18 + 2, 4 * 18 + 2)
    panels = reconstruction_panels(model, imgs, mask_ratio=0.75, mean=MEAN3, std=STD3, noise=noise)
    mask = panels["mask"].expand(-1, 3, -1, -1)  # (B, 3, H, W)
    assert int(panels["mask"].sum()) == 3 * 12 * 16  # 12 of 16 patches removed per image, 16 px each
    original = (imgs * torch.tensor(STD3).view(1, 3, 1, 1) + torch.tensor(MEAN3).view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(panels["original"], original)
    pasted = panels["reconstruction + visible"]
    assert torch.equal(pasted[~mask], panels["original"][~mask])
    assert torch.equal(pasted[mask], panels["reconstruction"][mask])
    assert bool((panels["masked"][mask] == 0.5).all())
    assert torch.equal(panels["masked"][~mask], panels["original"][~mask])
    # the grid holds the panels: row 1 (image 1), column 3 (pasted) starts at (2 + 18, 2 + 3 * 18)
    assert torch.equal(grid[:, 20:36, 56:72], pasted[1])
    # the mask follows the noise: the 4 patches with the smallest noise are the visible ones
    kept = noise[0].argsort()[:4]
    visible = (~panels["mask"][0, 0]).reshape(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16).all(dim=1)
    assert sorted(torch.nonzero(visible).flatten().tolist()) == sorted(kept.tolist())


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_display_units_with_and_without_norm_pix_loss(norm_pix_loss):
    model, imgs = tiny_mae(img_size=16, norm_pix_loss=norm_pix_loss), images(b=2) * 0.5
    with torch.no_grad():  # the decoder now predicts 0 for every pixel of every patch
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.zero_()
    panels = reconstruction_panels(model, imgs, mask_ratio=0.5, mean=MEAN3, std=STD3)
    if norm_pix_loss:
        # 0 in per-patch units is the patch mean: each patch shows its true mean (over pixels and channels)
        target = model.patchify(imgs)  # (B, N, 48)
        expected_norm = model.unpatchify(target.mean(dim=-1, keepdim=True).expand_as(target))
    else:
        expected_norm = torch.zeros_like(imgs)  # 0 in normalised-input units is the dataset mean
    expected = (expected_norm * torch.tensor(STD3).view(1, 3, 1, 1) + torch.tensor(MEAN3).view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(panels["reconstruction"], expected)
    assert ("true patch stats" in reconstruction_caption(model)) == norm_pix_loss


def test_reconstruction_grey_input_becomes_three_equal_channels_and_mode_restored():
    model = tiny_mae(img_size=16, in_chans=1)
    model.train()
    grid = reconstruction_grid(model, images(b=2, c=1), mask_ratio=0.75, mean=(0.5,), std=(0.5,))
    assert grid.shape == (3, 2 * 18 + 2, 4 * 18 + 2)
    assert torch.equal(grid[0], grid[1]) and torch.equal(grid[1], grid[2])
    assert model.training


def test_reconstruction_rejects_a_classifier():
    with pytest.raises(TypeError, match="masked autoencoder"):
        reconstruction_grid(tiny_classifier(), images(), mask_ratio=0.75, mean=None, std=None)


def test_save_png_round_trips_pixels(tmp_path):
    img = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    path = save_png(img, tmp_path / "sub" / "x.png")
    back = np.asarray(Image.open(path))
    assert back.shape == (5, 7, 3)
    np.testing.assert_array_equal(back, (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left behind


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    write_json(tmp_path / "s.json", {"a": [1.5, float("nan")], "b": {"c": float("inf")}})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1.5, None], "b": {"c": None}}


# ---------------------------------------------------------------- write_all_figures


def _assert_png(path):
    with Image.open(path) as im:
        im.verify()


def test_write_all_figures_mae_writes_every_file_and_valid_json(tmp_path):
    model = tiny_mae(img_size=16, norm_pix_loss=True)
    summary = write_all_figures(
        model, images(b=3), tmp_path / "figs", mean=MEAN3, std=STD3, mask_ratios=(0.5, 0.75)
    )
    expected = {
        "patch_embedding.png", "position_similarity.png", "attention_distance.png", "cls_attention.png",
        "reconstructions.png", "summary.json",
    }
    assert {p.name for p in (tmp_path / "figs").iterdir()} == expected
    assert set(summary["files"]) == expected
    for name in expected - {"summary.json"}:
        _assert_png(tmp_path / "figs" / name)
    on_disk = json.loads((tmp_path / "figs" / "summary.json").read_text())
    assert on_disk == summary
    assert len(on_disk["attention_distance"]["per_head"]) == 2
    assert on_disk["reconstruction"]["mask_ratios"] == [0.5, 0.75]
    assert "true patch stats" in on_disk["reconstruction"]["caption"]
    assert len(on_disk["patch_embedding"]["explained_variance_ratio"]) == 28


def test_write_all_figures_classifier_grey_skips_reconstructions(tmp_path):
    model = tiny_classifier(img_size=16, in_chans=1)
    summary = write_all_figures(model, images(c=1), tmp_path, mean=(0.5,), std=(0.5,))
    assert "reconstructions.png" not in summary["files"] and not (tmp_path / "reconstructions.png").exists()
    assert summary["skipped"] == {"reconstructions": "not a masked autoencoder"}
    assert {p.name for p in tmp_path.iterdir()} == set(summary["files"])


def test_write_all_figures_hybrid_skips_patch_embedding(tmp_path):
    torch.manual_seed(0)
    model = ViTClassifier(img_size=16, in_chans=3, num_classes=3, hybrid=("r18", 1), **TINY)
    summary = write_all_figures(model, images(b=2), tmp_path, mean=MEAN3, std=STD3)
    assert "patch_embedding" in summary["skipped"] and not (tmp_path / "patch_embedding.png").exists()
    assert summary["grid_size"] == [4, 4]


def test_write_all_figures_refuses_a_file_as_output_folder(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("keep me")
    with pytest.raises(ConfigError):
        write_all_figures(tiny_classifier(), images(), target, mean=MEAN3, std=STD3)
    assert target.read_text() == "keep me"
