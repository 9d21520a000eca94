"""What the MAE reconstructs: original | masked | reconstruction | reconstruction with visible patches pasted back.

Used by the pretraining loop every N steps (TensorBoard `add_image` and a PNG via `save_png`) and by
`figures.write_all_figures` at several mask ratios. Images come in as the normalised network inputs
and are un-normalised with the dataset mean/std for display.

With `norm_pix_loss` the MAE predicts every patch in its own normalised units (zero mean, unit
variance), which cannot be shown as pixels. For DISPLAY ONLY, the prediction is mapped back with the
true patch statistics of the original image, `pred * sqrt(var + 1e-6) + mean` (unbiased variance, as
the loss): the picture then shows the predicted structure, not a prediction of the patch's brightness
or contrast. `reconstruction_caption` says so and should label such figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

from mae_vit.viz.io import save_png

__all__ = ["reconstruction_caption", "reconstruction_grid", "reconstruction_panels", "save_png", "to_display"]

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
GREY = 0.5  # display value of removed patches


def to_display(imgs: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Normalised images (B, C, H, W), C in {1, 3} -> displayable (B, 3, H, W) in [0, 1] (grey repeated to RGB).

    `mean`/`std` are the per-channel values the inputs were normalised with (length C or 1);
    None means the inputs are already in [0, 1].
    """
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, C, H, W) with 1 or 3 channels, got {tuple(imgs.shape)}")
    x = imgs.detach().float().cpu()
    if std is not None:
        x = x * torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    if mean is not None:
        x = x + torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    x = x.clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _check_mae(model) -> None:
    for attr in ("patchify", "unpatchify", "norm_pix_loss", "forward_decoder"):
        if not hasattr(model, attr):
            raise TypeError(
                f"{type(model).__name__} is not a masked autoencoder (no `{attr}`); reconstructions need an MAE "
                "model (unwrap it from DDP / accelerate first)"
            )


def reconstruction_caption(model) -> str:
    """Label for a reconstruction figure of `model`, naming the columns and the display de-normalisation."""
    text = " | ".join(PANELS)
    if getattr(model, "norm_pix_loss", False):
        text += " (reconstruction de-normalised with true patch stats, for display only)"
    return text


@torch.no_grad()
def reconstruction_panels(
    model,
    imgs: torch.Tensor,
    *,
    mask_ratio: float,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the MAE once and return the four display panels, each (B, 3, H, W) float in [0, 1] on the CPU.

    Keys: "original", "masked" (removed patches grey), "reconstruction" (the decoder's prediction of
    every patch), "reconstruction + visible" (the prediction in removed patches, the original pixels,
    copied exactly, in visible ones), and "mask" (B, 1, H, W) bool, True where a patch was removed.
    `noise` (B, N) fixes which patches are removed (the smallest noise values are kept). The model is
    run in eval mode and its previous train/eval mode restored.
    """
    _check_mae(model)
    device = next(model.parameters()).device
    x = imgs.to(device)
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(x, mask_ratio=mask_ratio, noise=None if noise is None else noise.to(device))
    finally:
        model.train(was_training)
    pred = pred.float()  # (B, N, P*P*C), in normalised-input units (or per-patch units with norm_pix_loss)
    if model.norm_pix_loss:
        target = model.patchify(x.float())  # (B, N, P*P*C)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    recon = model.unpatchify(pred)  # (B, C, H, W)
    mask_px = model.unpatchify(mask.float().unsqueeze(-1).expand_as(pred))[:, :1] > 0.5  # (B, 1, H, W)
    mask_px = mask_px.cpu()

    original = to_display(x, mean, std)  # (B, 3, H, W)
    reconstruction = to_display(recon, mean, std)
    return {
        "original": original,
        "masked": torch.where(mask_px, torch.full_like(original, GREY), original),
        "reconstruction": reconstruction,
        "reconstruction + visible": torch.where(mask_px, reconstruction, original),
        "mask": mask_px,
    }


def reconstruction_grid(model, imgs: torch.Tensor, *, padding: int = 2, **panel_options) -> torch.Tensor:
    """One row per image: original | masked | reconstruction | reconstruction + visible, as a (3, H', W') image.

    Float in [0, 1] (what TensorBoard's `add_image` and `save_png` take); white `padding` pixels
    around every tile, so H' = B * (H + padding) + padding and W' = 4 * (W + padding) + padding.
    `panel_options` (mask_ratio, mean, std, noise) go to `reconstruction_panels`; `reconstruction_caption`
    gives a label.
    """
    panels = reconstruction_panels(model, imgs, **panel_options)
    tiles = torch.stack([panels[name] for name in PANELS], dim=1)  # (B, 4, 3, H, W)
    return make_grid(tiles.flatten(0, 1), nrow=len(PANELS), padding=padding, pad_value=1.0)
