"""The configuration of every tool: one dataclass each, made of the sections of `schema.py`.

A tool's schema holds only the keys the tool reads, so a key it would ignore stops it as an unknown
key. `parse_config(PretrainConfig, argv)` (`cli.py`) fills one in from

    schema defaults  <  YAML files (--config FILE)  <  command line (key=value and shorthand flags)

FLAGS maps a tool's shorthand flags to (dotted key, metavar).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from mae_vit.config.schema import (
    AT_LEAST_0,
    NAME,
    POSITIVE,
    POSITIVE_OR_NULL,
    UNIT,
    AdamWConfig,
    AugmentConfig,
    ClassifyDataConfig,
    ClassifyRunConfig,
    DataConfig,
    FewShotConfig,
    FinetuneModelConfig,
    FinetuneOptimConfig,
    Flags,
    KnnConfig,
    LarsConfig,
    MaeModelConfig,
    ModelConfig,
    PretrainKnnConfig,
    PretrainRunConfig,
    ProbeModelConfig,
    TrainDataConfig,
    _range,
    key,
    one_of,
)

__all__ = ["BenchmarkConfig", "ChainConfig", "EvaluateConfig", "ExportHfConfig", "ExportOnnxConfig", "FinetuneConfig",
           "LinprobeConfig", "MakeShardsConfig", "PretrainConfig", "ReportConfig", "SweepConfig", "VisualizeConfig"]

_TRAIN_FLAGS = {"--output-dir": ("train.output_dir", "DIR"), "--data": ("data.train", "URLS")}
_TOOL_FLAGS = {"--output-dir": ("output_dir", "DIR"), "--data": ("data.train", "URLS"),
               "--checkpoint": ("checkpoint", "PATH")}


def section(cls, **defaults):
    """A section field of dataclass `cls` whose defaults differ for this tool."""
    return field(default_factory=lambda: cls(**defaults))


@dataclass
class PretrainConfig:
    """MAE pretraining of a ViT encoder on unlabelled images.

    The defaults are the demo (configs/pretrain/demo.yaml says why each value): a small MAE (a 6-block 128-wide
    encoder on 8 px patches, half of them masked; a 1-block decoder) on 8,192 synthetic 32 px images held in
    memory, for 12 epochs: under 3 minutes on a 2-core CPU in fp32. The paper's ImageNet recipes are in
    configs/pretrain/.
    """

    FLAGS: Flags = dict(_TRAIN_FLAGS)
    # the demo's size comes with its name (mini: 128 wide, 6 blocks, 4 heads), so a recipe that names another
    # model gets that model's size, not the demo's
    model: MaeModelConfig = section(MaeModelConfig, name="mae_vit_mini_patch8", mask_ratio=0.5, decoder_embed_dim=128,
                                    decoder_depth=1, decoder_num_heads=4)
    data: TrainDataConfig = section(TrainDataConfig, in_memory=None, synthetic_samples=8192)  # in memory: demo only
    optim: AdamWConfig = section(AdamWConfig, base_lr=4e-3, epochs=12, warmup_epochs=1)
    train: PretrainRunConfig = section(PretrainRunConfig, output_dir="runs/pretrain", save_every=100, vis_every=100)
    knn: PretrainKnnConfig = section(PretrainKnnConfig)
    online_probe: bool = key(True, "with labelled shards: train a linear head on the masked encoder's class token "
                             "(its gradient stops there) and log its val top-1 every epoch")


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of a (pretrained) ViT classifier."""

    FLAGS: Flags = {**_TRAIN_FLAGS, "--checkpoint": ("checkpoint", "PATH"), "--resolution": ("resolution", "N"),
                    "--num-classes": ("model.num_classes", "K")}
    model: FinetuneModelConfig = section(FinetuneModelConfig, name="vit_tiny_patch4")
    data: ClassifyDataConfig = section(ClassifyDataConfig)
    optim: FinetuneOptimConfig = section(FinetuneOptimConfig, base_lr=5e-4, betas=[0.9, 0.999], epochs=100,
                                         warmup_epochs=5, min_lr=1e-6)
    augment: AugmentConfig = section(AugmentConfig)
    train: ClassifyRunConfig = section(ClassifyRunConfig, output_dir="runs/finetune")
    checkpoint: Optional[str] = key(None, "pretrained weights to start from; None = random init")
    resolution: Optional[int] = key(None, "overrides model.img_size", POSITIVE_OR_NULL)


@dataclass
class LinprobeConfig:
    """Linear probing: a linear classifier on frozen encoder features (LARS, as in MAE).

    LARS scales each layer's step by trust x ||w|| / ||grad||, so its lr is a relative step size: the
    paper's lr (0.1 x 16384 / 256 = 6.4) is the default here whatever the batch, because the linear
    scaling rule at a small batch (0.025 at 64) leaves the head nearly untrained. The recipes in
    configs/linprobe/ set `lr: null` to use base_lr x effective batch / 256 as the paper does.
    """

    FLAGS: Flags = {**_TRAIN_FLAGS, "--checkpoint": ("checkpoint", "PATH")}
    model: ProbeModelConfig = section(ProbeModelConfig, name="vit_tiny_patch4", global_pool=False)
    data: ClassifyDataConfig = section(ClassifyDataConfig, crop_scale=[0.08, 1.0])
    optim: LarsConfig = section(LarsConfig, base_lr=0.1, lr=6.4, weight_decay=0.0, epochs=90, warmup_epochs=10)
    train: ClassifyRunConfig = section(ClassifyRunConfig, output_dir="runs/linprobe")
    checkpoint: Optional[str] = key(None, "pretrained weights whose features are probed")
    feature_cache: bool = key(False, "extract features once (no augmentation) and train on the cache")
    probe_sweep: bool = key(True, "with feature_cache: also train 15 heads (lr x weight decay) on the cache at once, "
                            "choose one on a held-out tenth of the training set, report its val top-1")


METRICS = ("top1", "knn", "fewshot")


@dataclass
class EvaluateConfig:
    """Evaluation of a checkpoint: top-1 accuracy, kNN and few-shot classification."""

    FLAGS: Flags = dict(_TOOL_FLAGS)
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    knn: KnnConfig = section(KnnConfig)
    fewshot: FewShotConfig = section(FewShotConfig)
    checkpoint: Optional[str] = key(None, "weights to evaluate")
    output_dir: str = key("runs/evaluate", "metrics are written here")
    metrics: List[str] = key(list(METRICS), "any of top1, knn, fewshot", _range(
        lambda v: len(v) > 0 and all(m in METRICS for m in v), "a non-empty list of: " + ", ".join(METRICS)))


@dataclass
class SweepConfig:
    """Score every kept checkpoint of a pretraining run (kNN, few-shot), plot it and export the best encoder."""

    FLAGS: Flags = {"--run": ("run", "DIR"), "--data": ("data.train", "URLS")}
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    knn: KnnConfig = section(KnnConfig)
    fewshot: FewShotConfig = section(FewShotConfig, shots=[10])
    run: str = key("runs/pretrain", "the pretraining run directory whose checkpoints are scored")


@dataclass
class ExportHfConfig:
    """Export a checkpoint to the Hugging Face transformers layout (config.json + model.safetensors)."""

    FLAGS: Flags = {"--checkpoint": ("checkpoint", "PATH"), "--output-dir": ("output_dir", "DIR")}
    model: ModelConfig = section(ModelConfig)
    checkpoint: Optional[str] = key(None, "the weights to export (a run directory or a weights file)")
    output_dir: str = key("runs/hf", "the folder transformers' from_pretrained loads")


@dataclass
class ExportOnnxConfig:
    """Export a checkpoint to ONNX: a classifier as image -> logits, an MAE as its encoder (image -> features)."""

    FLAGS: Flags = {"--checkpoint": ("checkpoint", "PATH"), "--output": ("output", "FILE")}
    model: ModelConfig = section(ModelConfig)
    checkpoint: Optional[str] = key(None, "the weights to export (a run directory or a weights file)")
    output: str = key("runs/model.onnx", "the ONNX file to write (replaced only once the new one is whole)")


@dataclass
class ReportConfig:
    """A Markdown report of run directories (given first on the command line): lineage, metrics, curves."""

    FLAGS: Flags = {"--output-dir": ("output_dir", "DIR")}
    output_dir: str = key("runs/report", "report.md and the curves are written here")


@dataclass
class VisualizeConfig:
    """Figures of what an encoder learned (ViT paper fig. 7) and MAE reconstructions, for any checkpoint."""

    FLAGS: Flags = dict(_TOOL_FLAGS)
    model: ModelConfig = section(ModelConfig)
    data: TrainDataConfig = section(TrainDataConfig)
    checkpoint: Optional[str] = key(None, "MAE weights to visualise")
    output_dir: str = key("runs/visualize", "images are written here")
    num_images: int = key(8, "images per grid", POSITIVE)
    mask_ratios: List[float] = key([0.5, 0.75, 0.9], "one grid column group per ratio", _range(
        lambda v: len(v) > 0 and all(0 <= r < 1 for r in v), "a non-empty list of numbers in [0, 1)"))
    seed: int = key(0, "picks the images and the masks")


@dataclass
class MakeShardsConfig:
    """Write a data set as WebDataset tar shards plus an index (synthetic, Fashion-MNIST or an image folder)."""

    FLAGS: Flags = {"--output-dir": ("output_dir", "DIR"), "--source": ("source", "SRC")}
    source: str = key("synthetic", "synthetic | fashion-mnist | a folder of images")
    output_dir: str = key("data/synthetic", "shards and index are written here")
    split: str = key("train", "which part of the source: train | val | test (folder: FOLDER/<split> if present)", NAME)
    samples_per_shard: int = key(1000, "a new shard starts after this many samples", POSITIVE)
    max_shard_bytes: int = key(100_000_000, "... or after this many bytes", POSITIVE)
    overwrite: bool = key(False, "replace existing shards with this prefix in output_dir")
    prefix: str = key("shard", "shard file name prefix", NAME)
    num_samples: int = key(2048, "synthetic: number of images", POSITIVE)
    num_classes: int = key(10, "synthetic: number of classes", POSITIVE)
    img_size: int = key(32, "synthetic: image size in pixels", POSITIVE)
    seed: int = key(0, "synthetic: random seed")
    stats: bool = key(True, "record per-channel mean/std, image sizes, duplicates and unreadable files in the index")


@dataclass
class ChainConfig:
    """The Fashion-MNIST chain: shards, MAE pretraining, kNN/few-shot, linear probe, fine-tuning vs scratch, report."""

    FLAGS: Flags = {"--preset": ("preset", "NAME"), "--output-dir": ("output_dir", "DIR"),
                    "--data-dir": ("data_dir", "DIR"), "--val-samples": ("val_samples", "N"),
                    "--train-samples": ("train_samples", "N")}
    preset: str = key("cpu", "cpu (about 95 min in fp32 on 2 cores) | small (the small-data recipes, for "
                      "--train-samples 5000) | gpu (8.7 min on one H200)", one_of("cpu", "small", "gpu"))
    output_dir: Optional[str] = key(None, "runs and report; None = runs/fashion_mnist_<preset>[_<train_samples>]")
    data_dir: str = key("data/fashion-mnist", "the shards are written here once: test/ and heldout-<val_samples>-"
                        "seed<split_seed>/ (val/, fit/ or fit-<train_samples>/)")
    source: str = key("fashion-mnist", "where the idx files are: fashion-mnist (Debian package, ./data) | "
                      "fashion-mnist:DIR")
    val_samples: int = key(5000, "training images held out as the validation split that makes every choice (best "
                           "checkpoint, probe epoch, kNN monitor); the test split is evaluated once per run", POSITIVE)
    train_samples: Optional[int] = key(None, "train on this many of the remaining training images (a subset, e.g. "
                                       "5000: a stand-in for a small data set); None = all of them", POSITIVE_OR_NULL)
    split_seed: int = key(0, "draws the held-out split and the training subset")
    shards_only: bool = key(False, "write the shards (test, held-out val, training part) and stop: for the recipes in "
                            "configs/*/fashion_mnist.yaml run by hand")


@dataclass
class BenchmarkConfig:
    """Time the MAE pretraining train step and count its FLOPs: the yardstick for speed work."""

    FLAGS: Flags = {f"--{name.replace('_', '-')}": (name, metavar) for name, metavar in (
        ("model", "NAME"), ("batch_size", "N"), ("img_size", "PX"), ("mask_ratio", "R"), ("device", "DEV"),
        ("precision", "P"), ("steps", "N"), ("warmup", "N"), ("json", "FILE"), ("compare", "PEER"),
        ("table", "FILE"))} | {"--data": ("loader", "URLS")}
    model: str = key("mae_vit_base_patch16", "an MAE model name (create_model)")
    batch_size: int = key(8, "images per step", POSITIVE)
    img_size: int = key(224, "image size in pixels (square)", POSITIVE)
    mask_ratio: float = key(0.75, "fraction of patches removed", UNIT)
    device: str = key("auto", "auto | cpu | cuda | cuda:N")
    precision: str = key("auto", "auto (bf16 autocast on a GPU that has it, else fp32) | fp32 | bf16")
    steps: int = key(10, "timed steps (the median is reported)", POSITIVE)
    warmup: int = key(3, "untimed steps first (compilation happens here)", AT_LEAST_0)
    compile: bool = key(False, "time torch.compile(model)")
    json: Optional[str] = key(None, "also write the numbers to this file as JSON")
    compare: Optional[str] = key(None, "hf: time ours against transformers' ViTMAEForPreTraining in the same run, "
                                 "switch by switch (interleaved rounds)",
                                 _range(lambda v: v in (None, "hf"), "hf or null"))
    rounds: int = key(3, "--compare: interleaved rounds (each contender's figure is the median of all its steps)",
                      POSITIVE)
    sweep: bool = key(False, "time the step over image sizes (img_size / 2, img_size) x mask ratios 0.5, 0.75, 0.9")
    profile: bool = key(False, "print the top operators of two train steps (torch.profiler)")
    knn: bool = key(False, "time the kNN evaluation: a 200,000 x 768 bank against 10,000 queries, bounded and not")
    loader: Optional[str] = key(None, "(--data) shard URLs: time the loader alone with 0, 1, 2, ... workers, and say "
                              "whether training would wait for data")
    loader_seconds: float = key(10.0, "--data: seconds per worker count", _range(lambda v: v > 0, "positive"))
    gpu_decode: bool = key(False, "--data: time the data.gpu_decode path (JPEGs decoded on --device in the main "
                           "process) instead of decoding in the workers")
    table: Optional[str] = key(None, "print the Markdown table of a JSON file this tool wrote, and nothing else")
