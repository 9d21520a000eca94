"""The online probe: a linear head that learns, during pretraining, what the encoder's features are worth.

It sits on the class token of the *masked* encoder pass that MAE training runs anyway, behind a
`detach()`, so it costs one small matmul per batch and teaches the encoder nothing: the MAE trains
exactly as without it. Its own lr is fixed (`HEAD_LR`, Adam-style), not the schedule's. Evaluated on
data.val with the same masking (a fixed mask per batch), it answers "is pretraining working?" every
epoch, as solo-learn's and lightly's online probes do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_LR = 1e-2


class OnlineProbe(nn.Module):
    """The MAE (`mae`) and a BatchNorm + linear head on its masked encoder's class token (`head`)."""

    def __init__(self, mae: nn.Module, num_classes: int):
        super().__init__()
        self.mae = mae
        with torch.random.fork_rng(devices=[]):  # the run's random draws (masks, crops) stay those of a run without it
            self.head = nn.Sequential(nn.BatchNorm1d(mae.embed_dim, affine=False),
                                      nn.Linear(mae.embed_dim, num_classes))
        nn.init.zeros_(self.head[1].weight)  # chance before it learns: every class scores the same
        nn.init.zeros_(self.head[1].bias)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None, mask_ratio: float, noise=None):
        """Training: (MAE loss, probe cross-entropy). Evaluation (`labels` None): the probe's logits (B, K)."""
        latent, mask, ids_restore = self.mae.forward_encoder(imgs, mask_ratio, noise)  # (B, 1 + L_keep, D)
        logits = self.head(latent[:, 0].detach().float())  # (B, K): no gradient into the encoder
        if labels is None:
            return logits
        loss = self.mae.forward_loss(imgs, self.mae.forward_decoder(latent, ids_restore), mask)
        return loss, F.cross_entropy(logits, labels)


class ProbeClassifier(nn.Module):
    """images -> the online probe's logits with a fixed mask per batch size, for `classifier_metrics`."""

    def __init__(self, probe: OnlineProbe, mask_ratio: float):
        super().__init__()
        self.probe, self.mask_ratio = probe, mask_ratio

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=imgs.device).manual_seed(0)
        noise = torch.rand(imgs.shape[0], self.probe.mae.patch_embed.num_patches, generator=gen, device=imgs.device)
        return self.probe(imgs, None, self.mask_ratio, noise)


def probe_param_groups(probe: OnlineProbe) -> list[dict]:
    """The head's optimizer group: its own fixed lr, no weight decay."""
    return [{"params": list(probe.head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0, "fixed_lr": HEAD_LR}]
