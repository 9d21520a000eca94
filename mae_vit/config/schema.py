"""What every tool can be told: one dataclass per tool, made of sections that hold only the keys it reads.

A key the tool would ignore is therefore an unknown key (the command line stops with suggestions).
Each field carries its --help text and, where the type says too little, its check:
`key(default, help, check)`; `cli.py` reads the command line into these and runs the checks.
"""

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple


def key(default, help: str, check: Optional[Tuple] = None):
    """A config field: its default, its --help text and (test, what the value must be) or None."""
    meta = {"help": help, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _range(test, what: str) -> Tuple:
    return (test, what)


POSITIVE = _range(lambda v: v > 0, "a positive integer")
POSITIVE_OR_NULL = _range(lambda v: v is None or v > 0, "a positive integer or null")
AT_LEAST_0 = _range(lambda v: v >= 0, "0 or more")
POSITIVE_NUMBER = _range(lambda v: v > 0, "positive")
POSITIVE_OR_NULL_NUMBER = _range(lambda v: v is None or v > 0, "positive or null")
UNIT = _range(lambda v: 0 <= v < 1, "in [0, 1)")
NAME = _range(lambda v: re.fullmatch(r"[\w.-]+", v) is not None, "a name of letters, digits, '_', '-' or '.'")
DURATION = _range(lambda v: re.fullmatch(r"\d+(\.\d+)?[smhd]", str(v)) is not None and float(str(v)[:-1]) > 0,
                  "a duration such as 90s, 45m, 36h or 2d")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # what the transforms take (data/transforms.py)


# Accelerate's experiment trackers (`log_with`) and the module each one needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive"}


def one_of(*choices) -> Tuple:
    return _range(lambda v: v in choices, "one of: " + ", ".join(choices))


def _numbers(v) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)


# ---------------------------------------------------------------------------------------- model


@dataclass
class EncoderConfig:
    """the ViT encoder"""
    name: str = key("mae_vit_tiny_patch4", "any create_model name")
    img_size: int = key(32, "input resolution in pixels (square)", POSITIVE)
    patch_size: Optional[int] = key(None, "None: the one in the name", POSITIVE_OR_NULL)
    embed_dim: Optional[int] = key(None, "None: the named size's width (tiny 192 ... huge 1280)")
    depth: Optional[int] = key(None, "None: the named size's number of blocks")
    num_heads: Optional[int] = key(None, "None: the named size's number of heads")
    in_chans: int = key(3, "image channels; must match len(data.mean)", POSITIVE)
    pos_embed: str = key("sincos", "sincos (fixed 2-D) | learned (1-D learnable)", one_of("sincos", "learned"))


@dataclass
class _Trained:
    drop_path_rate: float = key(0.0, "stochastic depth rate of the last block (linear in depth)", UNIT)
    grad_checkpointing: bool = key(False, "recompute block activations in backward to save memory")


@dataclass
class _Decoder:
    norm_pix_loss: bool = key(True, "loss on per-patch normalised pixels")
    decoder_embed_dim: Optional[int] = key(None, "decoder width; None = the paper's 512")
    decoder_depth: Optional[int] = key(None, "decoder blocks; None = the paper's 8")
    decoder_num_heads: Optional[int] = key(None, "decoder heads; None = the paper's 16")


@dataclass
class _Head:
    global_pool: bool = key(True, "True: average of patch tokens + fc_norm; False: the class token")
    num_classes: Optional[int] = key(None, "None: read from the shard index", POSITIVE_OR_NULL)


@dataclass
class MaeModelConfig(_Decoder, _Trained, EncoderConfig):
    """the MAE: encoder and decoder"""
    mask_ratio: float = key(0.75, "fraction of patches hidden from the encoder (the loss is on those)",
                            _range(lambda v: 0 < v < 1,
                                   "in (0, 1), e.g. 0.75: with none hidden there is nothing to learn"))


@dataclass
class FinetuneModelConfig(_Head, _Trained, EncoderConfig):
    """the classifier"""


@dataclass
class ProbeModelConfig(_Head, EncoderConfig):
    """the classifier; its encoder is frozen"""


@dataclass
class ModelConfig(_Head, _Decoder, EncoderConfig):
    """the model the checkpoint holds (MAE or classifier); its run's config.yaml fills these in"""


# ---------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """data"""
    train: Optional[str] = key(None, "WebDataset URLs, brace-expanded; None = synthetic demo shards (made on first "
                                     "use)")
    val: Optional[str] = key(None, "WebDataset URLs of the validation split; None = synthetic (or none)")
    index: Optional[str] = key(None, "the index of the data.train shards (path, URL or pipe: command printing it: "
                               "make_shards' shard-index.json or a wids index); needed for pipe: shards; None = "
                               "the one beside the shards (local or http(s))")
    batch_size: int = key(64, "per process", POSITIVE)
    num_workers: int = key(2, "data-loading worker processes per training process", AT_LEAST_0)
    mean: Optional[List[float]] = key(None, "per-channel normalisation mean; null = the training shards' own (the "
                                      "statistics make_shards keeps in their index), else (and for the synthetic "
                                      "demo) ImageNet's", _range(
        lambda v: v is None or (len(v) > 0 and _numbers(v)), "a non-empty list of numbers, or null"))
    std: Optional[List[float]] = key(None, "per-channel normalisation std; null: as data.mean", _range(
        lambda v: v is None or (len(v) > 0 and _numbers(v) and min(v) > 0), "a list of positive numbers, or null"))
    interpolation: str = key("bicubic", "resize filter: bicubic | bilinear | nearest | ...", one_of(*INTERPOLATIONS))
    crop_pct: Optional[float] = key(None, "evaluation resize+center crop; None = 0.875 up to 224 px, 1.0 above",
                                    _range(lambda v: v is None or 0 < v <= 1, "in (0, 1] or null"))
    cache_dir: str = key("~/.cache/mae_vit", "where synthetic demo shards are written")
    synthetic_samples: int = key(2048, "size of the synthetic demo set (train); val is 1/4 of it", POSITIVE)
    synthetic_classes: int = key(10, "classes of the synthetic demo set", POSITIVE)


@dataclass
class TrainDataConfig(DataConfig):
    """data"""
    shuffle_buffer: int = key(1000, "samples held for WebDataset shuffling; 0 = no shuffle", AT_LEAST_0)
    crop_scale: List[float] = key([0.2, 1.0], "RandomResizedCrop scale", _range(
        lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two increasing numbers in (0, 1], e.g. [0.2, 1.0]"))
    hflip: bool = key(True, "random horizontal flips during training")
    in_memory: Optional[bool] = key(False, (
        "null (pretraining's default): true for the synthetic demo shards, false for --data shards. true: decode "
        "the training shards once into one uint8 tensor on the device (the GPU if any) and crop, flip and "
        "normalise whole batches there; for small sets of one image size (Fashion-MNIST, CIFAR), at most 8 GiB; "
        "resizes without antialiasing; fine-tuning also needs augment.randaug_num_ops=0 augment.reprob=0; linear "
        "probing with feature_cache=true caches features instead"))
    gpu_decode: bool = key(False, "DataLoader workers leave JPEGs encoded; the training process decodes each batch "
                           "in one call on the GPU (nvJPEG) and crops, flips and normalises it there: for runs whose "
                           "CPU cores cannot decode as fast as the GPU trains; without a GPU the same code runs on "
                           "the CPU in the training process; fine-tuning also needs augment.randaug_num_ops=0 "
                           "augment.reprob=0; ignored with data.in_memory=true")


@dataclass
class ClassifyDataConfig(TrainDataConfig):
    """data"""
    test: Optional[str] = key(None, "WebDataset URLs of a test split, evaluated ONCE at the end with the weights "
                              "chosen on data.val (best.safetensors); its figures go to metrics.json as `test`. Keep "
                              "it out of every choice: data.val should be held out from the training set; null = no "
                              "test")


@dataclass
class AugmentConfig:
    """fine-tuning augmentation (official MAE fine-tuning recipe)"""
    randaug_num_ops: int = key(2, "0 disables RandAugment", AT_LEAST_0)
    randaug_magnitude: int = key(9, "RandAugment strength, 0..30", _range(lambda v: 0 <= v <= 30, "in 0..30"))
    mixup: float = key(0.8, "Beta(alpha) for MixUp; 0 disables", AT_LEAST_0)
    cutmix: float = key(1.0, "Beta(alpha) for CutMix; 0 disables", AT_LEAST_0)
    label_smoothing: float = key(0.1, "weight moved from the true class to all classes", UNIT)
    reprob: float = key(0.25, "random erasing probability", _range(lambda v: 0 <= v <= 1, "in [0, 1]"))


# ---------------------------------------------------------------------------------------- optimizer, run


@dataclass
class OptimConfig:
    """optimizer and lr schedule"""
    base_lr: float = key(1.5e-4, "lr = base_lr * effective_batch / 256, unless lr is set", POSITIVE_NUMBER)
    lr: Optional[float] = key(None, "absolute lr, overrides base_lr", POSITIVE_OR_NULL_NUMBER)
    min_lr: float = key(0.0, "floor of the cosine schedule", AT_LEAST_0)
    weight_decay: float = key(0.05, "decoupled weight decay (not applied to biases, norms, tokens)", AT_LEAST_0)
    clip_grad: Optional[float] = key(None, "max gradient norm; None = off", POSITIVE_OR_NULL_NUMBER)
    epochs: int = key(800, "length of the lr schedule", POSITIVE)
    warmup_epochs: float = key(40, "linear warmup from 0 (may be fractional)", AT_LEAST_0)
    effective_batch: Optional[int] = key(None, "reached by gradient accumulation; None = batch_size x processes",
                                         POSITIVE_OR_NULL)
    time_budget: Optional[str] = key(None, "e.g. 45m, 36h: fit the schedule to end in this wall time (instead of "
                                     "epochs); fixed after measuring the first steps", _range(
                                         lambda v: v is None or re.fullmatch(r"\d+(\.\d+)?[smhd]", v) is not None,
                                         "a duration such as 90s, 45m, 36h or 2d, or null"))


@dataclass
class AdamWConfig(OptimConfig):
    """AdamW and lr schedule"""
    betas: List[float] = key([0.9, 0.95], "AdamW betas", _range(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                                                "two numbers in [0, 1)"))
    fused: bool = key(True, "torch's fused AdamW kernel (one pass over all parameters); false = its foreach kernel")


@dataclass
class FinetuneOptimConfig(AdamWConfig):
    """AdamW with layer-wise lr decay, and lr schedule"""
    layer_decay: float = key(0.75, "block i's lr x layer_decay ** (depth + 1 - i); 1.0 = off",
                             _range(lambda v: 0 < v <= 1, "in (0, 1] (1.0 = off)"))


@dataclass
class LarsConfig(OptimConfig):
    """LARS (linear probe) and lr schedule"""
    momentum: float = key(0.9, "LARS momentum", UNIT)


@dataclass
class TrainConfig:
    """the run"""
    output_dir: str = key("runs/train", "checkpoints, logs and the resolved config go here")
    resume: bool = key(True, "continue from the newest good checkpoint in output_dir")
    overwrite: bool = key(False, "allow starting over in a non-empty output_dir (with resume=false)")
    seed: int = key(0, "random seed")
    mixed_precision: str = key("auto", "auto (bf16 where it is fast: a GPU that has it, a CPU with AMX; else no) | "
                               "no | fp16 | bf16", one_of("auto", "no", "fp16", "bf16"))
    compile: bool = key(False, "torch.compile the model (minutes of compilation first; falls back to eager with a "
                        "log line where torch cannot compile)")
    tf32: bool = key(True, "on a GPU, fp32 matmuls use TensorFloat-32 (Ampere and newer; no effect on a CPU)")
    trackers: List[str] = key(["tensorboard"], "where metrics are logged, through Accelerate: any of " + ", ".join(
        TRACKERS) + " (each needs its package, and is set up by its own environment variables); [] = none",
        _range(lambda v: all(t in TRACKERS for t in v), "a list of: " + ", ".join(TRACKERS)))
    max_steps: Optional[int] = key(None, "stop after this many optimizer steps (the schedule still spans epochs)",
                                   POSITIVE_OR_NULL)
    save_every: int = key(500, "optimizer steps between checkpoints", POSITIVE)
    keep_last: int = key(3, "checkpoints kept in output_dir", POSITIVE)
    log_every: int = key(10, "optimizer steps between log lines", POSITIVE)
    nan_retries: int = key(2, "after a NaN / infinite loss: reload the last checkpoint, skip the data that diverged, "
                           "go on; this many times per run, then stop with the error", AT_LEAST_0)
    collective_timeout: str = key("30m", "how long a process waits in a collective (all-reduce, barrier) for the "
                                  "others before it fails: main-process-only work (a big checkpoint on slow storage) "
                                  "must fit in it", DURATION)


@dataclass
class PretrainRunConfig(TrainConfig):
    """the run"""
    vis_every: int = key(500, "optimizer steps between reconstruction grids", POSITIVE)


@dataclass
class ClassifyRunConfig(TrainConfig):
    """the run"""
    eval_every: int = key(1, "epochs between evaluations on data.val", POSITIVE)


@dataclass
class KnnConfig:
    """kNN classification of frozen features"""
    k: int = key(20, "neighbours that vote", POSITIVE)
    temperature: float = key(0.07, "vote weight exp(similarity / temperature)", _range(lambda v: v > 0, "positive"))


@dataclass
class PretrainKnnConfig(KnnConfig):
    """kNN classification of the encoder's features, on labelled data.train / data.val"""
    every: int = key(0, "kNN monitor every N epochs when data.val is set; 0 = off", AT_LEAST_0)
    vs_random: bool = key(True, "at the end: kNN of the encoder vs the same encoder at random init")


@dataclass
class FewShotConfig:
    """few-shot linear classification of frozen features"""
    shots: List[int] = key([1, 5, 10, 25], "labelled images per class",
                           _range(lambda v: len(v) > 0 and min(v) > 0, "a non-empty list of positive integers"))
    draws: int = key(5, "random draws of the support set per shot count", POSITIVE)
    l2: float = key(1e-3, "ridge regularisation", AT_LEAST_0)


Flags = ClassVar[Dict[str, Tuple[str, str]]]
