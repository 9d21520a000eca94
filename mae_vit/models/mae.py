"""Masked autoencoder (He et al. 2022) on the ViT encoder.

imgs (B, C, H, W)
  -> patch tokens + pos (B, L, D) -> keep a random L_keep = int(L * (1 - mask_ratio)) per sample
  -> prepend class token (B, 1 + L_keep, D) -> encoder blocks -> norm              [forward_encoder]
  -> decoder_embed (B, 1 + L_keep, Dd) -> append mask tokens, unshuffle (B, 1 + L, Dd)
  -> + fixed sin-cos decoder pos -> decoder blocks -> norm -> pred (B, L, P*P*C)    [forward_decoder]
  -> mean squared error on the removed patches only                                  [forward_loss]

Numerically the official `models_mae.py`: masking by argsort of uniform noise (smallest kept), the
same parameter names, initialisation and loss (with `norm_pix_loss`, each target patch is normalised
by its own mean and unbiased variance, eps 1e-6).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mae_vit.layers import LN_EPS, Block, sincos_2d
from mae_vit.models.vit import VisionTransformer


class MaskedAutoencoderViT(VisionTransformer):
    def __init__(
        self,
        *,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
        **encoder_kwargs,
    ):
        super().__init__(**encoder_kwargs)
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed_dim = decoder_embed_dim
        num_patches = self.patch_embed.num_patches
        mlp_ratio = encoder_kwargs.get("mlp_ratio", 4.0)
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_embed_dim, self.grid_size)[None])
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    # ---- pixels <-> patches (official order `nchpwq -> nhwpqc`: patch row, patch column; inside: pixel row,
    # pixel column, channel). h, w: the patch grid; p, q: a patch's pixel rows and columns (both patch_size).
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, P*P*C)."""
        p, (h, w) = self.patch_size, self.grid_size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", h=h, w=w, p=p, q=p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, P*P*C) -> (B, C, H, W)."""
        p, (h, w) = self.patch_size, self.grid_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=p, q=p)

    # ---- masking
    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep the `int(L * (1 - mask_ratio))` tokens with the smallest noise, per sample.

        x: (B, L, D) -> kept (B, L_keep, D), mask (B, L) with 1 = removed, ids_restore (B, L).
        """
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise ValueError(f"noise must have shape {(B, L)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: smallest noise first = kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, L_keep, D)
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return kept, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """(B, C, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L)."""
        x = self.embed(imgs)  # (B, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (B, L_keep, D)
        x = self.prepend_cls(x)  # (B, 1 + L_keep, D)
        return self.norm(self.run_blocks(x)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + L_keep, D) -> pred (B, L, P*P*C)."""
        x = self.decoder_embed(latent)  # (B, 1 + L_keep, Dd)
        B, n, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(B, L + 1 - n, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        x = self.run_blocks(x, self.decoder_blocks)  # checkpointed too with grad_checkpointing
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1 + L, P*P*C)
        return x[:, 1:]  # drop the class token

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only."""
        target = self.patchify(imgs)  # (B, L, P*P*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """-> (loss, pred (B, L, P*P*C), mask (B, L) with 1 = removed). `noise` (B, L) fixes the mask."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
