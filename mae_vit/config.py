"""Typed configuration for every tool, and the command line that fills it in.

One schema of dataclasses serves all tools: each tool has a top-level dataclass (`PretrainConfig`,
`FinetuneConfig`, ...) made of shared sections (`ModelConfig`, `DataConfig`, `OptimConfig`, ...)
whose defaults may differ per tool. `parse_config` builds a struct-mode OmegaConf `DictConfig` from

    schema defaults  <  YAML file (--config FILE)  <  command line (key=value and shorthand flags)

and checks every key, type and value on the way, so that a typo is reported as a one-paragraph
`ConfigError` naming the key and the closest valid keys instead of a traceback deep in training.
The trailing comment of each field is its documentation: `--help` prints it next to the default.
"""

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import os
import re
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mae_vit.errors import ConfigError
from mae_vit.files import write_text
from mae_vit.paths import expand_path, resolve_paths

# --------------------------------------------------------------------------------------------
# Sections shared by the tools
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "mae_vit_tiny_patch4"   # any create_model name
    img_size: int = 32                  # input resolution in pixels (square)
    patch_size: Optional[int] = None    # None: the one in the name
    embed_dim: Optional[int] = None     # None: the named size's width (tiny 192 ... huge 1280)
    depth: Optional[int] = None         # None: the named size's number of blocks
    num_heads: Optional[int] = None     # None: the named size's number of heads
    in_chans: int = 3                   # image channels; must match len(data.mean)
    pos_embed: str = "sincos"           # "sincos" (fixed 2-D) | "learned" (1-D learnable)
    drop_path_rate: float = 0.0         # stochastic depth rate of the last block (linear in depth)
    grad_checkpointing: bool = False    # recompute block activations in backward to save memory
    norm_pix_loss: bool = True          # MAE only: loss on per-patch normalised pixels
    mask_ratio: float = 0.75            # MAE only: fraction of patches hidden from the encoder
    decoder_embed_dim: Optional[int] = None  # MAE only: decoder width; None = the paper's 512
    decoder_depth: Optional[int] = None      # MAE only: decoder blocks; None = the paper's 8
    decoder_num_heads: Optional[int] = None  # MAE only: decoder heads; None = the paper's 16
    global_pool: bool = True            # classifier: True = average of patch tokens + fc_norm; False = class token
    num_classes: Optional[int] = None   # classifier: None = read from the shard index


@dataclass
class DataConfig:
    train: Optional[str] = None         # WebDataset URLs, brace-expanded; None = synthetic demo shards (made on first use)
    val: Optional[str] = None           # WebDataset URLs of the validation split; None = synthetic (or none)
    batch_size: int = 64                # per process
    num_workers: int = 2                # data-loading worker processes per training process
    shuffle_buffer: int = 1000          # samples held for WebDataset shuffling; 0 = no shuffle
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per-channel normalisation mean
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])   # per-channel normalisation std
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])       # RandomResizedCrop scale
    interpolation: str = "bicubic"      # resize filter: bicubic | bilinear | nearest | ...
    hflip: bool = True                  # random horizontal flips during training
    crop_pct: Optional[float] = None    # evaluation resize+center crop; None = 0.875 up to 224 px, 1.0 above
    cache_dir: str = "~/.cache/mae_vit"  # where synthetic demo shards are written
    synthetic_samples: int = 2048       # size of the synthetic demo set (train); val is 1/4 of it
    synthetic_classes: int = 10         # classes of the synthetic demo set


@dataclass
class AugmentConfig:                    # fine-tuning augmentation (official MAE fine-tuning recipe)
    randaug_num_ops: int = 2            # 0 disables RandAugment
    randaug_magnitude: int = 9          # RandAugment strength, 0..30
    mixup: float = 0.8                  # Beta(alpha) for MixUp; 0 disables
    cutmix: float = 1.0                 # Beta(alpha) for CutMix; 0 disables
    label_smoothing: float = 0.1        # weight moved from the true class to all classes
    reprob: float = 0.25                # random erasing probability


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4             # lr = base_lr * effective_batch / 256, unless lr is set
    lr: Optional[float] = None          # absolute lr, overrides base_lr
    min_lr: float = 0.0                 # floor of the cosine schedule
    weight_decay: float = 0.05          # decoupled weight decay (not applied to biases, norms, tokens)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    momentum: float = 0.9               # LARS (linear probe)
    layer_decay: float = 1.0            # 1.0 = off
    clip_grad: Optional[float] = None   # max gradient norm; None = off
    epochs: int = 800                   # length of the lr schedule
    warmup_epochs: float = 40           # linear warmup from 0 (may be fractional)
    effective_batch: Optional[int] = None  # reached by gradient accumulation; None = batch_size x processes


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"   # checkpoints, logs and the resolved config go here
    resume: bool = True                 # continue from the newest good checkpoint in output_dir
    overwrite: bool = False             # allow starting over in a non-empty output_dir (with resume=false)
    seed: int = 0                       # random seed
    mixed_precision: str = "no"         # no | fp16 | bf16
    max_steps: Optional[int] = None     # stop after this many optimizer steps (the schedule still spans `epochs`)
    save_every: int = 500               # optimizer steps between checkpoints
    keep_last: int = 3                  # checkpoints kept in output_dir
    log_every: int = 10                 # optimizer steps between log lines
    vis_every: int = 500                # reconstruction grids (pretraining)
    eval_every: int = 1                 # epochs between evaluations (fine-tune / probe)


@dataclass
class KnnConfig:
    k: int = 20                         # neighbours that vote
    temperature: float = 0.07           # vote weight exp(similarity / temperature)
    every: int = 0                      # pretraining: kNN monitor every N epochs when data.val is set; 0 = off
    vs_random: bool = True              # pretraining, at the end: kNN of the encoder vs the same encoder at random init


@dataclass
class FewShotConfig:
    shots: List[int] = field(default_factory=lambda: [1, 5, 10, 25])  # labelled images per class
    draws: int = 5                      # random draws of the support set per shot count
    l2: float = 1e-3                    # ridge regularisation


# --------------------------------------------------------------------------------------------
# One top-level schema per tool. FLAGS maps a shorthand flag to (dotted key, metavar).
# --------------------------------------------------------------------------------------------

_TRAIN_FLAGS = {"--output-dir": ("train.output_dir", "DIR"), "--data": ("data.train", "URLS")}
_TOOL_FLAGS = {"--output-dir": ("output_dir", "DIR"), "--data": ("data.train", "URLS")}
_CHECKPOINT_FLAG = {"--checkpoint": ("checkpoint", "PATH")}


@dataclass
class PretrainConfig:
    """MAE pretraining of a ViT encoder on unlabelled images.

    The defaults are the demo: a small MAE (ViT-Tiny/4 encoder cut to 6 blocks, 2-block 128-wide decoder)
    on the synthetic 32 px shards for 30 epochs, about 5 minutes on a 2-core CPU. The paper's ImageNet
    recipes are in configs/pretrain/.
    """

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = dict(_TRAIN_FLAGS)

    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(depth=6, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
    )
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=4e-3, epochs=30, warmup_epochs=1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(save_every=100, vis_every=100))
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of a (pretrained) ViT classifier."""

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = {
        **_TRAIN_FLAGS,
        **_CHECKPOINT_FLAG,
        "--resolution": ("resolution", "N"),
        "--num-classes": ("model.num_classes", "K"),
    }

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_tiny_patch4"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            base_lr=5e-4, betas=[0.9, 0.999], layer_decay=0.75, epochs=100, warmup_epochs=5, min_lr=1e-6
        )
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/finetune"))
    checkpoint: Optional[str] = None    # pretrained weights to start from; None = random init
    resolution: Optional[int] = None    # overrides model.img_size


@dataclass
class LinprobeConfig:
    """Linear probing: a linear classifier on frozen encoder features (LARS, as in MAE).

    LARS scales each layer's step by trust x ||w|| / ||grad||, so its lr is a relative step size: the
    paper's lr (0.1 x 16384 / 256 = 6.4) is the default here whatever the batch, because the linear
    scaling rule at a small batch (0.025 at 64) leaves the head nearly untrained. The recipes in
    configs/linprobe/ set `lr: null` to use base_lr x effective batch / 256 as the paper does.
    """

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = {**_TRAIN_FLAGS, **_CHECKPOINT_FLAG}

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_tiny_patch4", global_pool=False))
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=[0.08, 1.0]))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(base_lr=0.1, lr=6.4, weight_decay=0.0, epochs=90, warmup_epochs=10)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/linprobe"))
    checkpoint: Optional[str] = None    # pretrained weights whose features are probed
    feature_cache: bool = False         # extract features once (no augmentation) and train on the cache


@dataclass
class EvaluateConfig:
    """Evaluation of a checkpoint: top-1 accuracy, kNN and few-shot classification."""

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = {**_TOOL_FLAGS, **_CHECKPOINT_FLAG}

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    checkpoint: Optional[str] = None    # weights to evaluate
    output_dir: str = "runs/evaluate"   # metrics are written here
    metrics: List[str] = field(default_factory=lambda: ["top1", "knn", "fewshot"])  # any of top1, knn, fewshot


@dataclass
class VisualizeConfig:
    """Figures of what an encoder learned (ViT paper fig. 7) and MAE reconstructions, for any checkpoint."""

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = {**_TOOL_FLAGS, **_CHECKPOINT_FLAG}

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: Optional[str] = None    # MAE weights to visualise
    output_dir: str = "runs/visualize"  # images are written here
    num_images: int = 8                 # images per grid
    mask_ratios: List[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])  # one grid column group per ratio
    seed: int = 0                       # picks the images and the masks


@dataclass
class MakeShardsConfig:
    """Write a data set as WebDataset tar shards plus an index (synthetic, Fashion-MNIST or an image folder)."""

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = {
        "--output-dir": ("output_dir", "DIR"),
        "--source": ("source", "SRC"),
    }

    source: str = "synthetic"           # "synthetic" | "fashion-mnist" | a folder of images
    output_dir: str = "data/synthetic"  # shards and index are written here
    split: str = "train"                # which part of the source: train | val | test (folder: FOLDER/<split> if present)
    samples_per_shard: int = 1000       # a new shard starts after this many samples
    max_shard_bytes: int = 100_000_000  # ... or after this many bytes
    overwrite: bool = False             # replace existing shards with this prefix in output_dir
    prefix: str = "shard"               # shard file name prefix
    num_samples: int = 2048             # synthetic: number of images
    num_classes: int = 10               # synthetic: number of classes
    img_size: int = 32                  # synthetic: image size in pixels
    seed: int = 0                       # synthetic: random seed


@dataclass
class ChainConfig:
    """The Fashion-MNIST chain: shards, MAE pretraining, kNN/few-shot, linear probe, fine-tuning vs scratch, report."""

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = {
        "--preset": ("preset", "NAME"),
        "--output-dir": ("output_dir", "DIR"),
        "--data-dir": ("data_dir", "DIR"),
    }

    preset: str = "cpu"                 # cpu (about 50 min on 2 cores) | gpu (about 10 min on one H100)
    output_dir: Optional[str] = None    # runs and report; None = runs/fashion_mnist_<preset>
    data_dir: str = "data/fashion-mnist"  # the train/ and test/ shards are written here once
    source: str = "fashion-mnist"       # where the idx files are: fashion-mnist (Debian package, ./data) | fashion-mnist:DIR


@dataclass
class BenchmarkConfig:
    """Time the MAE pretraining train step and count its FLOPs: the yardstick for speed work."""

    FLAGS: ClassVar[Dict[str, Tuple[str, str]]] = {
        "--model": ("model", "NAME"),
        "--batch-size": ("batch_size", "N"),
        "--img-size": ("img_size", "PX"),
        "--mask-ratio": ("mask_ratio", "R"),
        "--device": ("device", "DEV"),
        "--precision": ("precision", "P"),
        "--steps": ("steps", "N"),
        "--warmup": ("warmup", "N"),
        "--json": ("json", "FILE"),
    }

    model: str = "mae_vit_base_patch16" # an MAE model name (create_model)
    batch_size: int = 8                 # images per step
    img_size: int = 224                 # image size in pixels (square)
    mask_ratio: float = 0.75            # fraction of patches removed
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str = "auto"             # auto (bf16 autocast on a GPU that has it, else fp32) | fp32 | bf16
    steps: int = 10                     # timed steps (the median is reported)
    warmup: int = 3                     # untimed steps first (compilation happens here)
    compile: bool = False               # time torch.compile(model)
    json: Optional[str] = None          # also write the numbers to this file as JSON


# --------------------------------------------------------------------------------------------
# The schema as a flat table of dotted keys (for lookups, suggestions and --help)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    path: str        # dotted key, e.g. "optim.lr"
    type: Any        # annotation, e.g. Optional[float]
    comment: str     # trailing comment of the field in this file


def _field_comments(cls: type) -> Dict[str, str]:
    """Map each field name of dataclass `cls` to the trailing `# comment` on its source line(s)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: Dict[int, str] = {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    result = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            result[node.target.id] = " ".join(found)
    return result


def _walk_schema(cls: type, prefix: str = "") -> Iterator[Tuple[str, bool, Any, str]]:
    """Yield (dotted path, is_section, annotation, comment) for every field, sections before their keys."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            yield path, True, annotation, _class_comment(annotation)
            yield from _walk_schema(annotation, path + ".")
        else:
            yield path, False, annotation, comments.get(f.name, "")


def _class_comment(cls: type) -> str:
    """The trailing comment on the `class X:` line, if any (a one-line description of a section)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return ""
    class_line = next((line for line in lines if line.lstrip().startswith("class ")), "")
    return class_line.split("#", 1)[1].strip() if "#" in class_line else ""


@functools.lru_cache(maxsize=None)
def _schema_keys(schema_cls: type) -> Tuple[Dict[str, _Key], Dict[str, str]]:
    """Leaf keys of a schema ({path: _Key}) and its sections ({path: comment})."""
    leaves, sections = {}, {}
    for path, is_section, annotation, comment in _walk_schema(schema_cls):
        if is_section:
            sections[path] = comment
        else:
            leaves[path] = _Key(path, annotation, comment)
    return leaves, sections


def _describe_type(annotation: Any) -> str:
    """Human words for a field type, used in wrong-type messages: 'an integer or null'."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return _describe_type(inner) + " or null"
    if typing.get_origin(annotation) in (list, List):
        return "a list of " + _describe_type(args[0]).split(" ", 1)[1] + "s"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        annotation, str(annotation)
    )


def _suggest(wrong: str, valid: List[str]) -> List[str]:
    """Up to three valid keys closest to `wrong`: whole dotted path first, then the last component alone."""
    close = difflib.get_close_matches(wrong, valid, n=3, cutoff=0.6)
    if not close:
        leaf = wrong.rsplit(".", 1)[-1]
        leaf_names = sorted({v.rsplit(".", 1)[-1] for v in valid})
        near = set(difflib.get_close_matches(leaf, leaf_names, n=3, cutoff=0.75))
        close = [v for v in valid if v.rsplit(".", 1)[-1] in near][:3]
    return close


def _did_you_mean(wrong: str, valid: List[str]) -> str:
    close = _suggest(wrong, valid)
    return f" Did you mean: {', '.join(close)}?" if close else ""


# --------------------------------------------------------------------------------------------
# Reading values: YAML files and key=value strings
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` (no dot) as a float, as YAML 1.2 and OmegaConf do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_value(text: str, key: str) -> Any:
    """A command-line value as a YAML scalar or list: '0.1' -> 0.1, 'null' -> None, '[1,2]' -> [1, 2]."""
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"cannot read the value of '{key}' on the command line: {text!r} is not valid YAML "
            f"({_one_line(e)}). Quote it or fix the brackets, e.g. optim.betas=[0.9,0.95]."
        ) from None


def _typed_value(text: str, key: str, leaves: Dict[str, _Key]) -> Any:
    """A command-line value typed by its field: text for a string key (`mixed_precision=no` stays "no",
    `--data '*.tar'` stays a pattern; `null` is None where the key allows it), YAML for the others."""
    annotation = leaves[key].type if key in leaves else None
    if annotation in (str, Optional[str]):
        return None if text == "null" else text  # null on a required string key is then refused by name
    return _parse_value(text, key)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_yaml(path: str) -> Dict[str, Any]:
    """The mapping stored in a YAML config file; ConfigError naming the file if that is not possible."""
    file = Path(expand_path(path))
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise ConfigError(
            f"config file '{path}' {what}. Pass an existing YAML file to --config, e.g. one written to "
            "the output directory of an earlier run (config.yaml)."
        )
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {_one_line(e)}. Check its permissions.") from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file '{path}' is not valid YAML: {_one_line(e)}. Fix the file at the position shown."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of keys (like 'optim: {{lr: 0.001}}'), "
            f"but it holds a {type(data).__name__}."
        )
    return data


def _flatten(data: Dict[Any, Any], leaves: Dict[str, _Key], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Nested YAML mapping -> (dotted key, value) pairs; mappings under a leaf key stay whole (and fail later)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in leaves:
            yield from _flatten(value, leaves, path + ".")
        else:
            yield path, value


# --------------------------------------------------------------------------------------------
# Applying values to the config
# --------------------------------------------------------------------------------------------


def _set(cfg: DictConfig, schema_cls: type, key: str, value: Any, source: str) -> None:
    """Set one dotted key, turning unknown keys and wrong types into a ConfigError naming `source`."""
    leaves, sections = _schema_keys(schema_cls)
    if key in sections:
        raise ConfigError(
            f"'{key}' ({source}) is a section, not a value; set its keys instead, e.g. "
            f"{next(p for p in leaves if p.startswith(key + '.'))}=... Run with --help to list every key."
        )
    if key not in leaves:
        raise ConfigError(
            f"unknown config key '{key}' ({source}).{_did_you_mean(key, list(leaves))} "
            "Run with --help to list every key."
        )
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException:
        raise ConfigError(
            f"config key '{key}' ({source}) must be {_describe_type(leaves[key].type)}, "
            f"but got {_quote(value)}. Run with --help to see every key with its default."
        ) from None


def _format_value(value: Any) -> str:
    """A value the way it would be written on the command line: null, true, [0.9, 0.95]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def _quote(value: Any) -> str:
    """Like _format_value, but strings in quotes so that a wrong word stands out in a message."""
    return repr(value) if isinstance(value, str) else _format_value(value)


# --------------------------------------------------------------------------------------------
# Value checks: what the types cannot say
# --------------------------------------------------------------------------------------------

_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
_METRICS = ("top1", "knn", "fewshot")


def _is_pos(v: Any) -> bool:
    return v is not None and v > 0


def _numbers(v: Any) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)


# (dotted key, test, what it must be). A key missing from a tool's schema is skipped.
_RULES = [
    ("model.img_size", _is_pos, "a positive integer"),
    ("model.patch_size", lambda v: v is None or v > 0, "a positive integer or null"),
    ("model.in_chans", _is_pos, "a positive integer"),
    ("model.pos_embed", lambda v: v in ("sincos", "learned"), "one of: sincos, learned"),
    ("model.drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.mask_ratio", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.75"),
    ("model.num_classes", lambda v: v is None or v > 0, "a positive integer or null"),
    ("data.batch_size", _is_pos, "a positive integer"),
    ("data.num_workers", lambda v: v >= 0, "0 or more"),
    ("data.shuffle_buffer", lambda v: v >= 0, "0 or more"),
    ("data.mean", lambda v: len(v) > 0 and _numbers(v), "a non-empty list of numbers"),
    ("data.std", lambda v: len(v) > 0 and _numbers(v) and all(x > 0 for x in v), "a list of positive numbers"),
    ("data.crop_scale", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
     "two increasing numbers in (0, 1], e.g. [0.2, 1.0]"),
    ("data.interpolation", lambda v: v in _INTERPOLATIONS, "one of: " + ", ".join(_INTERPOLATIONS)),
    ("data.crop_pct", lambda v: v is None or 0 < v <= 1, "in (0, 1] or null"),
    ("data.synthetic_samples", _is_pos, "a positive integer"),
    ("data.synthetic_classes", _is_pos, "a positive integer"),
    ("augment.randaug_num_ops", lambda v: v >= 0, "0 or more"),
    ("augment.randaug_magnitude", lambda v: 0 <= v <= 30, "in 0..30"),
    ("augment.mixup", lambda v: v >= 0, "0 or more"),
    ("augment.cutmix", lambda v: v >= 0, "0 or more"),
    ("augment.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("augment.reprob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.base_lr", _is_pos, "positive"),
    ("optim.lr", lambda v: v is None or v > 0, "positive or null"),
    ("optim.min_lr", lambda v: v >= 0, "0 or more"),
    ("optim.weight_decay", lambda v: v >= 0, "0 or more"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.layer_decay", lambda v: 0 < v <= 1, "in (0, 1] (1.0 = off)"),
    ("optim.clip_grad", lambda v: v is None or v > 0, "positive or null"),
    ("optim.epochs", _is_pos, "a positive integer"),
    ("optim.warmup_epochs", lambda v: v >= 0, "0 or more"),
    ("optim.effective_batch", lambda v: v is None or v > 0, "a positive integer or null"),
    ("train.mixed_precision", lambda v: v in ("no", "fp16", "bf16"), "one of: no, fp16, bf16"),
    ("train.max_steps", lambda v: v is None or v > 0, "a positive integer or null"),
    ("train.save_every", _is_pos, "a positive integer"),
    ("train.keep_last", _is_pos, "a positive integer"),
    ("train.log_every", _is_pos, "a positive integer"),
    ("train.vis_every", _is_pos, "a positive integer"),
    ("train.eval_every", _is_pos, "a positive integer"),
    ("knn.k", _is_pos, "a positive integer"),
    ("knn.temperature", _is_pos, "positive"),
    ("knn.every", lambda v: v >= 0, "0 (off) or more"),
    ("fewshot.shots", lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of positive integers"),
    ("fewshot.draws", _is_pos, "a positive integer"),
    ("fewshot.l2", lambda v: v >= 0, "0 or more"),
    ("resolution", lambda v: v is None or v > 0, "a positive integer or null"),
    ("metrics", lambda v: len(v) > 0 and all(m in _METRICS for m in v),
     "a non-empty list of: " + ", ".join(_METRICS)),
    ("num_images", _is_pos, "a positive integer"),
    ("mask_ratios", lambda v: len(v) > 0 and all(0 <= r < 1 for r in v), "a non-empty list of numbers in [0, 1)"),
    ("samples_per_shard", _is_pos, "a positive integer"),
    ("max_shard_bytes", _is_pos, "a positive integer"),
    ("num_samples", _is_pos, "a positive integer"),
    ("num_classes", _is_pos, "a positive integer"),
    ("img_size", _is_pos, "a positive integer"),
    ("preset", lambda v: v in ("cpu", "gpu"), "one of cpu, gpu"),
    ("split", lambda v: re.fullmatch(r"[\w.-]+", v) is not None, "a name of letters, digits, '_', '-' or '.'"),
    ("prefix", lambda v: re.fullmatch(r"[\w.-]+", v) is not None, "a name of letters, digits, '_', '-' or '.'"),
]

_MISSING = object()


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value that has the right type but makes no sense.

    Checks allowed choices and ranges (mixed_precision, pos_embed, 0 <= mask_ratio < 1, positive
    sizes, crop_scale, ...) and combinations (len(mean) == len(std) == model.in_chans,
    warmup_epochs <= epochs). Works on any tool's config; keys a tool does not have are skipped.
    """
    for key, test, requirement in _RULES:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if not test(value):
            raise ConfigError(f"config key '{key}' is {_quote(value)}, but it must be {requirement}.")
    _check_combinations(cfg)


def _check_combinations(cfg: DictConfig) -> None:
    if "data" in cfg:
        mean, std = list(cfg.data.mean), list(cfg.data.std)
        if len(mean) != len(std):
            raise ConfigError(
                f"data.mean has {len(mean)} value(s) but data.std has {len(std)}; give one mean and one std per "
                "image channel, e.g. data.mean=[0.5] data.std=[0.5] for grayscale images."
            )
        if "model" in cfg and len(mean) != cfg.model.in_chans:
            raise ConfigError(
                f"data.mean and data.std have {len(mean)} value(s) but model.in_chans is {cfg.model.in_chans}; "
                f"they must match (one mean/std per channel). Set model.in_chans={len(mean)} or give "
                f"{cfg.model.in_chans} values to data.mean and data.std."
            )
    if "optim" in cfg and cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise ConfigError(
            f"optim.warmup_epochs ({_format_value(cfg.optim.warmup_epochs)}) is longer than optim.epochs "
            f"({cfg.optim.epochs}); the warmup must fit in the schedule. Lower optim.warmup_epochs or raise "
            "optim.epochs."
        )


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def parse_config(schema_cls: type, argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> DictConfig:
    """Build a validated, struct-mode config for one tool from its schema and the command line.

    `argv` (default sys.argv[1:]) holds, in any order:
      --config FILE         YAML file merged over the defaults (may be repeated; later files win)
      key=value             dotted key; the value is typed by the key: text for string keys (mixed_precision=no),
                            YAML for the rest: optim.betas=[0.9,0.95], model.num_classes=null
      --flag VALUE          a shorthand from schema_cls.FLAGS, e.g. --output-dir DIR; also --flag=VALUE
      -h / --help           print every flag and key with default and meaning, then exit 0
    Precedence: defaults < YAML files < command-line keys and flags (which apply left to right).
    Any mistake raises ConfigError with one paragraph naming the key, flag or file at fault.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    flags: Dict[str, Tuple[str, str]] = dict(getattr(schema_cls, "FLAGS", {}))
    prog = prog or os.path.basename(sys.argv[0]) or "tool"
    if "-h" in argv or "--help" in argv:
        print(format_help(schema_cls, prog))
        raise SystemExit(0)

    config_files, overrides = _split_argv(argv, flags)
    cfg = OmegaConf.structured(schema_cls)
    OmegaConf.set_struct(cfg, True)
    leaves, _ = _schema_keys(schema_cls)
    for path in config_files:
        for key, value in _flatten(_read_yaml(path), leaves):
            _set(cfg, schema_cls, key, value, f"in config file '{path}'")
    for key, text, source in overrides:
        _set(cfg, schema_cls, key, _typed_value(text, key, leaves), source)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve an ${{...}} interpolation in the config: {_one_line(e)}") from None
    resolve_paths(cfg)  # `~`, $VARS, relative paths: absolute before anything reads or writes them
    validate_config(cfg)
    return cfg


def _split_argv(argv: List[str], flags: Dict[str, Tuple[str, str]]) -> Tuple[List[str], List[Tuple[str, str, str]]]:
    """Command-line words -> (YAML files, [(key, value text, source)]), keeping their order."""
    config_files: List[str] = []
    overrides: List[Tuple[str, str, str]] = []
    words = iter(argv)
    for word in words:
        if word.startswith("-"):
            name, has_value, text = word.partition("=")
            if name != "--config" and name not in flags:
                raise ConfigError(_unknown_flag_message(name, flags))
            if not has_value:
                text = next(words, None)
                if text is None:
                    metavar = flags[name][1] if name in flags else "FILE"
                    raise ConfigError(f"flag {name} needs a value: {name} {metavar} (or {name}={metavar}).")
            if name == "--config":
                config_files.append(text)
            else:
                overrides.append((flags[name][0], text, f"from flag {name}"))
        else:
            key, has_value, text = word.partition("=")
            if not has_value or not key:
                raise ConfigError(
                    f"cannot read the command-line argument {word!r}: settings are written key=value with a "
                    "dotted key, e.g. optim.lr=0.001 or data.batch_size=32 (flags start with --). "
                    "Run with --help to list every key."
                )
            overrides.append((key.strip(), text, "from the command line"))
    return config_files, overrides


def _unknown_flag_message(name: str, flags: Dict[str, Tuple[str, str]]) -> str:
    known = ["--config", *flags, "--help"]
    message = f"unknown flag '{name}'."
    as_key = name.lstrip("-").replace("-", "_")
    if "." in as_key or as_key in {k for k, _ in flags.values()}:
        message += f" Config keys are written without dashes: {as_key}=VALUE."
    else:
        message += _did_you_mean(name, known)
    return message + f" Flags of this tool: {', '.join(known)}. Run with --help to list every key."


def format_help(schema_cls: type, prog: str = "tool") -> str:
    """The --help text: usage, the tool's flags, then every key with its default and its comment."""
    flags: Dict[str, Tuple[str, str]] = dict(getattr(schema_cls, "FLAGS", {}))
    defaults = OmegaConf.structured(schema_cls)
    leaves, sections = _schema_keys(schema_cls)
    usage = " ".join(f"[{flag} {metavar}]" for flag, (_, metavar) in flags.items())
    lines = [f"usage: {prog} [-h] [--config FILE] {usage} [key=value ...]", ""]
    if schema_cls.__doc__:
        lines += [inspect.cleandoc(schema_cls.__doc__).split("\n\n")[0], ""]
    lines += [
        "Settings are the defaults below, then a YAML file (--config), then key=value overrides with",
        "dotted keys and YAML values (optim.betas=[0.9,0.95], model.num_classes=null); later ones win.",
        "",
        "flags:",
        f"  {'-h, --help':<24}show this help and exit",
        f"  {'--config FILE':<24}YAML file with any of the keys below, nested by section",
    ]
    lines += [f"  {flag + ' ' + metavar:<24}same as {key}=..." for flag, (key, metavar) in flags.items()]
    lines += ["", "keys (default, then meaning):"]
    width = max(len(f"{k} = {_format_value(OmegaConf.select(defaults, k))}") for k in leaves) + 2

    def key_line(path: str) -> str:
        setting = f"{path} = {_format_value(OmegaConf.select(defaults, path))}"
        return f"  {setting:<{width}}{leaves[path].comment}".rstrip()

    for section, comment in sections.items():
        lines.append(f"{section}:" + (f"  ({comment})" if comment else ""))
        lines += [key_line(p) for p in leaves if p.rsplit(".", 1)[0] == section]
    top_level = [p for p in leaves if "." not in p]
    if top_level and sections:
        lines.append("top-level keys:")
    lines += [key_line(p) for p in top_level]
    return "\n".join(lines)


def save_config(cfg: Any, path: "str | os.PathLike[str]") -> None:
    """Write the resolved config as YAML, atomically (temp file in the same folder, then os.replace).

    A crash mid-write never leaves a truncated file; an existing file at `path` is replaced only by a
    complete new one. The file can be read back with `parse_config(Schema, ["--config", path])`.
    """
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
