"""Image transforms of the MAE recipes (torchvision v2), for 3-channel RGB and 1-channel grey images.

Each builder returns a callable PIL image -> float tensor (C, H, W), normalised with mean/std. The
first step converts the PIL image to "RGB" or "L" to match `in_chans`, so any input mode works.
`mean`/`std` default to the ImageNet statistics for 3 channels and (0.5,)/(0.5,) for 1; their length
must equal `in_chans` (ConfigError otherwise).

- pretrain:  RandomResizedCrop(scale 0.2-1) + horizontal flip            (MAE pretraining)
- finetune:  RandomResizedCrop(0.08-1) + flip + RandAugment + RandomErasing  (MAE fine-tuning, the
             parts that exist in torchvision; RandomErasing fills with per-pixel noise like timm's "pixel")
- linprobe:  RandomResizedCrop(0.08-1) + flip                             (MAE linear probing)
- eval:      Resize(img_size / crop_pct) + CenterCrop(img_size)

`mixup_cutmix` is the batch-level MixUp/CutMix with label smoothing of the fine-tuning recipe.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2

from mae_vit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5,)
GREY_STD = (0.5,)
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class ToMode:
    """Convert a PIL image to "RGB" (in_chans=3) or "L" (in_chans=1); tensors pass unchanged."""

    def __init__(self, in_chans: int):
        self.mode = "RGB" if in_chans == 3 else "L"

    def __call__(self, image):
        if isinstance(image, Image.Image) and image.mode != self.mode:
            return image.convert(self.mode)
        return image

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


def to_8bit(image: Image.Image) -> Image.Image:
    """The rule for deep images: 16-bit ("I;16*") and 32-bit integer ("I") images are scaled so that
    0..65535 becomes 0..255 (not clipped at 255), float ("F") images are taken as 0..1; others unchanged."""
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def _stats(in_chans: int, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans!r}.")
    mean = tuple(mean) if mean is not None else (IMAGENET_MEAN if in_chans == 3 else GREY_MEAN)
    std = tuple(std) if std is not None else (IMAGENET_STD if in_chans == 3 else GREY_STD)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(
            f"The normalisation has mean of length {len(mean)} and std of length {len(std)}, but the images have "
            f"in_chans={in_chans} channel(s). Give one mean and one std value per channel "
            f"(e.g. mean=[0.5] std=[0.5] for grey images), or leave them unset for the defaults."
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"Every std value must be positive, got std={list(std)}.")
    return mean, std


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ConfigError(f"Unknown interpolation {name!r}; use one of {', '.join(_INTERPOLATIONS)}.")
    return _INTERPOLATIONS[name]


def _check_size(img_size: int) -> None:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ConfigError(f"img_size must be a positive integer, got {img_size!r}.")


class CropFlip:
    """RandomResizedCrop + horizontal flip of a PIL image with PIL's own crop and resize.

    The same crop parameters (torchvision's `RandomResizedCrop.get_params`, torch's RNG) and the same
    pixels as torchvision's crop-then-resize, without its per-transform overhead: at 28-32 px that
    overhead was most of the data loader's time.
    """

    _FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

    def __init__(self, img_size: int, scale: tuple[float, float], interpolation: str, hflip: bool):
        _interpolation(interpolation)  # ConfigError for an unknown name
        self.size, self.scale, self.hflip = img_size, tuple(scale), hflip
        self.filter = self._FILTERS[interpolation]

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, h, w = RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.filter)
        if self.hflip and torch.rand(1).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return f"CropFlip(size={self.size}, scale={self.scale}, hflip={self.hflip})"


class ToNormalisedTensor:
    """PIL image (uint8) -> float tensor (C, H, W), (pixel / 255 - mean) / std: torchvision's ToImage,
    ToDtype(scale=True) and Normalize in one step."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(array.copy()).view(array.shape[0], array.shape[1], -1).permute(2, 0, 1)  # (C, H, W)
        return x.float().div_(255.0).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ToNormalisedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _crop_flip(img_size, in_chans, crop_scale, interpolation, hflip) -> list:
    _check_size(img_size)
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}.")
    return [ToMode(in_chans), CropFlip(img_size, (lo, hi), interpolation, hflip)]


def _to_normalised_tensor(mean, std) -> list:
    return [ToNormalisedTensor(mean, std)]


def pretrain_transform(
    img_size: int,
    *,
    in_chans: int = 3,
    mean=None,
    std=None,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    interpolation: str = "bicubic",
    hflip: bool = True,
) -> v2.Compose:
    """MAE pretraining: RandomResizedCrop(crop_scale) + flip + normalise -> (in_chans, img_size, img_size)."""
    mean, std = _stats(in_chans, mean, std)
    steps = _crop_flip(img_size, in_chans, crop_scale, interpolation, hflip)
    return v2.Compose(steps + _to_normalised_tensor(mean, std))


def linprobe_transform(img_size: int, *, crop_scale: tuple[float, float] = (0.08, 1.0), **kwargs) -> v2.Compose:
    """Linear probing: the pretraining pipeline (RandomResizedCrop + flip + normalise), by default with
    torchvision's usual crop scale (0.08, 1); no other augmentation, as the official linear probe."""
    return pretrain_transform(img_size, crop_scale=crop_scale, **kwargs)


def finetune_transform(
    img_size: int,
    *,
    in_chans: int = 3,
    mean=None,
    std=None,
    randaug_num_ops: int = 2,
    randaug_magnitude: int = 9,
    reprob: float = 0.25,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    interpolation: str = "bicubic",
    hflip: bool = True,
) -> v2.Compose:
    """Fine-tuning: RandomResizedCrop + flip + RandAugment (none if num_ops == 0) + normalise + RandomErasing."""
    mean, std = _stats(in_chans, mean, std)
    if randaug_num_ops < 0 or not 0 <= randaug_magnitude <= 30:
        raise ConfigError(
            f"RandAugment needs num_ops >= 0 and magnitude in 0..30, got {randaug_num_ops} and {randaug_magnitude}."
        )
    if not 0 <= reprob <= 1:
        raise ConfigError(f"reprob is a probability in [0, 1], got {reprob}.")
    steps = _crop_flip(img_size, in_chans, crop_scale, interpolation, hflip)
    if randaug_num_ops > 0:
        randaug = v2.RandAugment(randaug_num_ops, randaug_magnitude, interpolation=_interpolation(interpolation))
        steps.append(randaug)
    steps += _to_normalised_tensor(mean, std)
    if reprob > 0:
        steps.append(v2.RandomErasing(p=reprob, value="random"))
    return v2.Compose(steps)


def default_crop_pct(img_size: int) -> float:
    """0.875 up to 224 px (the usual 256 -> 224 resize-crop), 1.0 above."""
    return 0.875 if img_size <= 224 else 1.0


def eval_transform(
    img_size: int,
    *,
    in_chans: int = 3,
    mean=None,
    std=None,
    crop_pct: float | None = None,
    interpolation: str = "bicubic",
    normalise: bool = True,
) -> v2.Compose:
    """Resize the shorter side to int(img_size / crop_pct), CenterCrop(img_size), normalise (`normalise=False`:
    a uint8 tensor (C, H, W) instead, for images kept in memory and normalised batch by batch)."""
    _check_size(img_size)
    mean, std = _stats(in_chans, mean, std)
    crop_pct = default_crop_pct(img_size) if crop_pct is None else crop_pct
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    resize = int(img_size / crop_pct)
    return v2.Compose(
        [ToMode(in_chans), v2.Resize(resize, interpolation=_interpolation(interpolation)), v2.CenterCrop(img_size)]
        + (_to_normalised_tensor(mean, std) if normalise else [v2.functional.pil_to_tensor])
    )


class MixupCutmix:
    """Batch transform `(images (B, C, H, W), labels long (B,)) -> (images, soft targets float (B, K))`.

    Picks MixUp or CutMix (torchvision v2, each with probability 1/2 when both are enabled) for the whole
    batch; each image is mixed with its neighbour in the batch (batch rolled by one) with a Beta(alpha,
    alpha) weight (CutMix: the pasted area). Then label smoothing:
    `targets = mixed_one_hot * (1 - label_smoothing) + label_smoothing / K`, so every row sums to 1 --
    identical to timm's Mixup targets. Train with soft-target cross entropy: `-(targets * log_softmax).sum(-1)`.
    """

    def __init__(self, num_classes: int, *, mixup: float, cutmix: float, label_smoothing: float):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.mix(images, labels)
        targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets


def mixup_cutmix(
    num_classes: int, *, mixup: float = 0.8, cutmix: float = 1.0, label_smoothing: float = 0.1
) -> MixupCutmix | None:
    """The fine-tuning batch mixer, or None when mixup == cutmix == 0 (use plain cross entropy with
    `label_smoothing` then). mixup/cutmix are the Beta alphas (MAE recipe: 0.8 / 1.0, smoothing 0.1)."""
    if mixup < 0 or cutmix < 0 or not 0 <= label_smoothing < 1:
        raise ConfigError(
            f"mixup and cutmix must be >= 0 and label_smoothing in [0, 1); got {mixup}, {cutmix}, {label_smoothing}."
        )
    if mixup == 0 and cutmix == 0:
        return None
    if num_classes < 2:
        raise ConfigError(f"MixUp/CutMix need at least 2 classes, got num_classes={num_classes}.")
    return MixupCutmix(num_classes, mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing)
