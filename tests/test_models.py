import pytest
import torch

from mae_vit.errors import ConfigError
from mae_vit.models import SIZES, MaskedAutoencoderViT, create_model

TINY = dict(img_size=16, patch_size=4)


def tiny_mae(**kw):
    kw = {**dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), **kw}
    return MaskedAutoencoderViT(**kw)


@pytest.mark.parametrize("size", list(SIZES))
def test_every_named_size_shapes(size):
    width, depth, heads = SIZES[size]
    # the big ones on the meta device: shapes without spending seconds on 600M random numbers
    device = "meta" if size in ("large", "huge") else "cpu"
    with torch.device(device):
        mae = create_model(f"mae_vit_{size}_patch8", img_size=16)
        clf = create_model(f"vit_{size}_patch8", img_size=16, num_classes=5)
        imgs = torch.randn(1, 3, 16, 16)
    assert len(mae.blocks) == depth and mae.blocks[0].attn.num_heads == heads
    assert len(mae.decoder_blocks) == 8 and mae.decoder_blocks[0].attn.num_heads == 16
    assert mae.cls_token.shape == (1, 1, width) and mae.pos_embed.shape == (1, 5, width)
    loss, pred, mask = mae(imgs)
    assert pred.shape == (1, 4, 8 * 8 * 3) and mask.shape == (1, 4) and loss.ndim == 0
    assert clf(imgs).shape == (1, 5)


def test_official_aliases_and_unknown_name():
    with torch.device("meta"):
        m = create_model("mae_vit_huge_patch14", img_size=28, decoder_depth=1)
    assert m.patch_size == 14 and m.embed_dim == 1280 and len(m.blocks) == 32
    assert len(m.decoder_blocks) == 1 and m.decoder_embed_dim == 512
    with pytest.raises(ConfigError, match="mae_vit_base_patch16"):
        create_model("mae_vit_bse_patch16")
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("mae_vit_tiny_patch4", num_classes=3)


def test_masking_keeps_exact_count_and_follows_noise():
    mae = tiny_mae()
    B, L, D = 3, 16, 5
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L)
    kept, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    assert kept.shape == (B, 4, D)  # int(16 * 0.25)
    assert torch.all(mask.sum(1) == 12)
    # kept = the 4 smallest-noise patches, in ascending noise order
    order = noise.argsort(1)[:, :4]
    torch.testing.assert_close(kept, torch.stack([x[b, order[b]] for b in range(B)]))
    # mask is 0 exactly at those patches
    expect = torch.ones(B, L)
    expect.scatter_(1, order, 0)
    torch.testing.assert_close(mask, expect)
    # ids_restore inverts the shuffle
    shuffle = noise.argsort(1)
    torch.testing.assert_close(torch.gather(shuffle, 1, ids_restore), torch.arange(L).expand(B, L))
    # int() truncation as the official code: L=16, ratio 0.7 -> keep int(4.8) = 4
    assert mae.random_masking(x, 0.7, noise)[0].shape[1] == 4


def test_same_noise_same_result_and_encoder_sees_only_visible():
    mae = tiny_mae().eval()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    a = mae(imgs, 0.75, noise)
    b = mae(imgs, 0.75, noise)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    latent, mask, _ = mae.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 1 + 4, 32)
    # changing a removed patch's pixels changes nothing in the encoder output
    removed = int(mask[0].argmax())
    r, c = divmod(removed, 4)
    imgs2 = imgs.clone()
    imgs2[0, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 10
    torch.testing.assert_close(mae.forward_encoder(imgs2, 0.75, noise)[0], latent)


def test_patchify_pixel_order_and_round_trip():
    mae = tiny_mae(img_size=(8, 12), in_chans=2)
    imgs = torch.randn(2, 2, 8, 12)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 6, 4 * 4 * 2)
    # patch index 4 = row 1, col 1; element (pixel row 2, pixel col 3, channel 1) at (2 * 4 + 3) * 2 + 1
    assert patches[1, 4, (2 * 4 + 3) * 2 + 1] == imgs[1, 1, 4 + 2, 4 + 3]
    torch.testing.assert_close(mae.unpatchify(patches), imgs)


def test_loss_ignores_visible_patches():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = (torch.rand(2, 16) > 0.5).float()
    loss = mae.forward_loss(imgs, pred, mask)
    pred2 = pred + 100 * (1 - mask).unsqueeze(-1)  # change only the visible patches' predictions
    torch.testing.assert_close(mae.forward_loss(imgs, pred2, mask), loss)
    target = mae.patchify(imgs)
    manual = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, manual)


def test_norm_pix_loss_hand_computed():
    mae = tiny_mae(img_size=4, patch_size=2, in_chans=1, norm_pix_loss=True)
    imgs = torch.zeros(1, 1, 4, 4)
    imgs[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # patch 0: mean 2.5, unbiased var 5/3
    pred = torch.zeros(1, 4, 4)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # target = (t - 2.5) / sqrt(5/3 + 1e-6); loss = mean(target^2) = (sum (t-2.5)^2 / 4) / (5/3 + 1e-6)
    #      = 1.25 / (5/3 + 1e-6)
    expect = 1.25 / (5.0 / 3.0 + 1e-6)
    assert abs(mae.forward_loss(imgs, pred, mask).item() - expect) < 1e-6
    mae.norm_pix_loss = False
    assert abs(mae.forward_loss(imgs, pred, mask).item() - 7.5) < 1e-6  # (1+4+9+16)/4


def test_zero_head_gives_zero_logits_and_pooling_modes():
    clf = create_model("vit_tiny_patch4", img_size=16, num_classes=7)
    assert torch.all(clf.head.weight == 0) and torch.all(clf.head.bias == 0)
    assert torch.all(clf(torch.randn(3, 3, 16, 16)) == 0)
    keys = set(clf.state_dict())
    assert "fc_norm.weight" in keys and "norm.weight" not in keys
    cls_pool = create_model("vit_tiny_patch4", img_size=16, num_classes=7, global_pool=False)
    keys = set(cls_pool.state_dict())
    assert "norm.weight" in keys and "fc_norm.weight" not in keys
    tokens = torch.randn(2, 17, 192)
    torch.testing.assert_close(cls_pool.pool(tokens), tokens[:, 0])
    torch.testing.assert_close(clf.pool(tokens), clf.fc_norm(tokens[:, 1:].mean(1)))


def test_initialisation_matches_official():
    mae = tiny_mae()
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    from mae_vit.layers import sincos_2d
    torch.testing.assert_close(mae.pos_embed[0], sincos_2d(32, (4, 4)))
    torch.testing.assert_close(mae.decoder_pos_embed[0], sincos_2d(16, (4, 4)))
    lin = mae.blocks[0].attn.qkv
    bound = (6 / (32 + 96)) ** 0.5  # xavier uniform on the fused (96, 32) matrix
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound and torch.all(lin.bias == 0)
    w = mae.patch_embed.proj.weight
    assert w.abs().max() <= (6 / (32 + 48)) ** 0.5
    assert torch.all(mae.blocks[0].norm1.weight == 1) and torch.all(mae.blocks[0].norm1.bias == 0)
    assert mae.blocks[0].norm1.eps == 1e-6
    assert 0.005 < mae.cls_token.std() < 0.05 and 0.005 < mae.mask_token.std() < 0.05
    learned = tiny_mae(pos_embed="learned")
    assert learned.pos_embed.requires_grad


def test_drop_path_and_checkpointing_change_nothing_in_eval():
    imgs = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    plain = create_model("vit_tiny_patch4", img_size=16, num_classes=3)
    torch.manual_seed(1)
    fancy = create_model("vit_tiny_patch4", img_size=16, num_classes=3, drop_path_rate=0.5, grad_checkpointing=True)
    for m in (plain, fancy):
        torch.nn.init.normal_(m.head.weight)
    fancy.head.load_state_dict(plain.head.state_dict())
    plain.eval(), fancy.eval()
    torch.testing.assert_close(plain(imgs), fancy(imgs))
    rates = [b.drop_path.rate for b in fancy.blocks]
    assert rates[0] == 0 and abs(rates[-1] - 0.5) < 1e-6 and rates == sorted(rates)
    # in training, drop path makes outputs random; checkpointing alone gives identical gradients
    torch.manual_seed(2)
    ck = create_model("vit_tiny_patch4", img_size=16, num_classes=3, grad_checkpointing=True)
    ck.load_state_dict(plain.state_dict())
    plain.train(), ck.train()
    plain(imgs).sum().backward()
    ck(imgs).sum().backward()
    torch.testing.assert_close(plain.blocks[0].attn.qkv.weight.grad, ck.blocks[0].attn.qkv.weight.grad)


def test_whole_image_features_and_attention_maps():
    mae = tiny_mae().eval()
    imgs = torch.randn(2, 3, 16, 16)
    feats = mae.forward_features(imgs)  # no masking: every patch
    assert feats.shape == (2, 17, 32)
    tokens, maps = mae.forward_features(imgs, return_attention=True)
    torch.testing.assert_close(tokens, feats, rtol=1e-5, atol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)


def test_hybrid_stem_and_grayscale():
    m = create_model("mae_vit_tiny_hybrid_r18", img_size=32, in_chans=1, hybrid_stages=2, decoder_depth=1)
    assert m.patch_size == 8 and m.grid_size == (4, 4)
    loss, pred, mask = m(torch.randn(2, 1, 32, 32))
    assert pred.shape == (2, 16, 64) and torch.isfinite(loss)
    assert any(k.startswith("patch_embed.backbone.layer2") for k in m.state_dict())


def test_higher_resolution_classifier_runs():
    clf = create_model("vit_tiny_patch4", img_size=(16, 24), num_classes=2)
    assert clf.grid_size == (4, 6) and clf.pos_embed.shape == (1, 25, 192)
    assert clf(torch.randn(1, 3, 16, 24)).shape == (1, 2)
