"""Parameter groups (weight-decay exclusions, layer decay) and LARS against hand-computed steps."""

import pytest
import torch
from torch import nn

from mae_vit.models import MaskedAutoencoderViT, VisionTransformer, create_model
from mae_vit.train.optim import LARS, build_optimizer, param_groups, set_lr


class TinyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)


class TinyViT(nn.Module):
    """Just the parameter names of a ViT (tokens, patch_embed, blocks.i, norm, head) and its declarations."""

    no_weight_decay = VisionTransformer.no_weight_decay
    layer_of = VisionTransformer.layer_of

    def __init__(self, depth=3, dim=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)


def names_by_group(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [sorted(name_of[id(p)] for p in g["params"]) for g in groups]


def test_groups_without_layer_decay():
    model = TinyViT()
    groups = param_groups(model, 0.05)
    assert [set(g) for g in groups] == [{"params", "weight_decay", "lr_scale"}] * 2
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0)]
    decay, no_decay = names_by_group(model, groups)
    assert decay == ["blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight", "head.weight",
                     "patch_embed.weight"]
    assert no_decay == sorted(
        ["cls_token", "pos_embed", "patch_embed.bias", "norm.weight", "norm.bias", "head.bias"]
        + [f"blocks.{i}.{p}" for i in range(3) for p in ("norm1.weight", "norm1.bias", "fc.bias")]
    )


def test_frozen_parameters_are_left_out():
    model = TinyViT()
    model.patch_embed.requires_grad_(False)
    model.cls_token.requires_grad_(False)
    names = sum(names_by_group(model, param_groups(model, 0.05)), [])
    assert len(names) == len(set(names)) == 20 - 3
    assert not {"patch_embed.weight", "patch_embed.bias", "cls_token"} & set(names)


def test_the_mae_declares_its_tokens_and_tables_free_of_weight_decay():
    mae = create_model("mae_vit_tiny_patch4", img_size=16, depth=1, decoder_depth=1, decoder_embed_dim=16,
                       decoder_num_heads=2)
    assert isinstance(mae, MaskedAutoencoderViT)
    assert mae.no_weight_decay() == {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    decay, no_decay = names_by_group(mae, param_groups(mae, 0.1))
    assert "mask_token" in no_decay and "decoder_embed.weight" in decay
    assert "pos_embed" not in decay + no_decay  # the fixed sin-cos tables are not trained at all


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cls_token", 0),
        ("pos_embed", 0),
        ("patch_embed.proj.weight", 0),
        ("blocks.0.attn.qkv.weight", 1),
        ("blocks.11.mlp.fc2.bias", 12),
        ("norm.weight", 13),
        ("fc_norm.bias", 13),
        ("head.weight", 13),
        ("decoder_blocks.0.fc.weight", 13),
        ("mask_token", 13),
    ],
)
def test_layer_of(name, expected):
    assert create_model("vit_tiny_patch4", img_size=16, depth=12, num_classes=2).layer_of(name) == expected


def test_layer_decay_scales_are_exact():
    model = TinyViT(depth=3)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay = {name_of[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    # num_layers = 3, scale = 0.5 ** (4 - id)
    assert scale["cls_token"] == scale["pos_embed"] == scale["patch_embed.weight"] == 0.0625
    assert scale["blocks.0.fc.weight"] == scale["blocks.0.norm1.bias"] == 0.125
    assert scale["blocks.1.fc.weight"] == 0.25
    assert scale["blocks.2.fc.bias"] == 0.5
    assert scale["norm.weight"] == scale["head.weight"] == scale["head.bias"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(scale) == 20  # every parameter exactly once
    assert decay["blocks.1.fc.weight"] == 0.05 and decay["blocks.1.fc.bias"] == 0.0 and decay["pos_embed"] == 0.0
    # one group per (depth, decay) pair that has parameters: depth 0..4, each with both kinds
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [
        (0.0625, 0.05), (0.0625, 0.0), (0.125, 0.05), (0.125, 0.0), (0.25, 0.05), (0.25, 0.0),
        (0.5, 0.05), (0.5, 0.0), (1.0, 0.05), (1.0, 0.0),
    ]


def test_layer_decay_needs_blocks():
    with pytest.raises(ValueError):
        param_groups(nn.Linear(2, 2), 0.05, layer_decay=0.75)


def test_build_optimizer_and_set_lr():
    model = TinyViT(depth=1)
    opt = build_optimizer("adamw", param_groups(model, 0.05, layer_decay=0.5), lr=1e-3, betas=[0.9, 0.95])
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4] * 2 + [5e-4] * 2 + [1e-3] * 2)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4] * 2 + [1e-3] * 2 + [2e-3] * 2)
    lars = build_optimizer("lars", param_groups(model, 0.0), lr=0.1, momentum=0.8)
    assert isinstance(lars, LARS) and lars.param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError):
        build_optimizer("sgd", param_groups(model, 0.0), lr=0.1)


def lars_pair():
    """A 1x2 weight with ||w|| = 5 and a bias, gradients chosen so that ||grad + 0.1 w|| = 1."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    w.grad = torch.tensor([[0.3, 0.4]], dtype=torch.float64)
    b.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    return w, b


def test_lars_two_hand_computed_steps():
    w, b = lars_pair()
    opt = LARS([w, b], lr=0.1, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    # weight: dp = [0.3, 0.4] + 0.1 * [3, 4] = [0.6, 0.8], ||dp|| = 1, q = 0.001 * 5 / 1 = 0.005
    #         mu = dp * q = [0.003, 0.004];  w = [3, 4] - 0.1 * mu = [2.9997, 3.9996]
    # bias:   no decay, no trust ratio: mu = [0.5, 0.25]; b = [1 - 0.05, -2 - 0.025]
    assert torch.allclose(w, torch.tensor([[2.9997, 3.9996]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(b, torch.tensor([0.95, -2.025], dtype=torch.float64), rtol=0, atol=1e-12)
    opt.step()  # same gradients again
    # weight: w = 0.9999 * [3, 4], so dp = 0.99995 * [0.6, 0.8], ||dp|| = 0.99995, ||w|| = 4.9995
    #         dp * q = 0.001 * 4.9995 * [0.6, 0.8] = [0.0029997, 0.0039996]
    #         mu = 0.9 * [0.003, 0.004] + that = [0.0056997, 0.0075996]
    #         w = [2.9997 - 0.00056997, 3.9996 - 0.00075996] = [2.99913003, 3.99884004]
    # bias:   mu = 0.9 * [0.5, 0.25] + [0.5, 0.25] = [0.95, 0.475]; b = [0.95 - 0.095, -2.025 - 0.0475]
    assert torch.allclose(w, torch.tensor([[2.99913003, 3.99884004]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(b, torch.tensor([0.855, -2.0725], dtype=torch.float64), rtol=0, atol=1e-12)


def test_lars_zero_weight_uses_trust_one_and_skips_missing_grads():
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    w.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    untouched = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = LARS([w, untouched], lr=0.5, weight_decay=0.1)
    opt.step()
    # ||w|| = 0 -> q = 1: w = 0 - 0.5 * (grad + 0.1 * 0)
    assert torch.equal(w.detach(), torch.tensor([[-0.5, -1.0], [-1.5, -2.0]], dtype=torch.float64))
    assert torch.equal(untouched.detach(), torch.ones(2, 2, dtype=torch.float64))
    assert untouched not in opt.state


def test_lars_uses_group_weight_decay_and_lr():
    w1, _ = lars_pair()
    w2, _ = lars_pair()
    opt = LARS([{"params": [w1], "weight_decay": 0.1}, {"params": [w2], "weight_decay": 0.0, "lr": 0.2}], lr=0.1)
    opt.step()
    assert torch.allclose(w1, torch.tensor([[2.9997, 3.9996]], dtype=torch.float64), atol=1e-12)
    # no decay: dp = [0.3, 0.4], ||dp|| = 0.5, q = 0.001 * 5 / 0.5 = 0.01, w -= 0.2 * [0.003, 0.004]
    assert torch.allclose(w2, torch.tensor([[2.9994, 3.9992]], dtype=torch.float64), atol=1e-12)
