"""What a checkpoint's run says about its model, merged into a tool's config.

A checkpoint of this project describes its own architecture in two places: the `config.yaml` of its run
directory (`find_run_config`), and, for the weights a run exports (`model.safetensors`, `best.safetensors`),
the file's safetensors metadata (`run_metadata`), so that a copy without its run folder says it too.

    evaluate, visualize, sweep, exports   the whole model section + the evaluation transform
                                          (`model_config_from_run`)
    fine-tuning, linear probing           the encoder's architecture + its normalisation, the name as a
                                          classifier (`encoder_config_from_run`)

Precedence everywhere: the tool's defaults < the run < the keys the user gave (`user_set_keys`). Foreign
weights (an official `.pth`, timm) have neither: the model is what the model.* keys say.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mae_vit.checkpoint import RUN_METADATA, read_metadata
from mae_vit.config.checks import validate_config
from mae_vit.config.schema import EncoderConfig
from mae_vit.errors import CheckpointError, ConfigError

log = logging.getLogger("mae_vit")

RUN_CONFIG = "config.yaml"  # written into every run directory by the training tools (RunDir.save_config)
RUN_DATA_KEYS = ("mean", "std", "crop_pct", "interpolation")  # how the run normalised and evaluated its images
ENCODER_KEYS = tuple(f.name for f in dataclasses.fields(EncoderConfig))  # name, img_size, patch_size, width, ...
NORMALISATION_KEYS = ("mean", "std")


def find_run_config(checkpoint: str | os.PathLike) -> Path | None:
    """The `config.yaml` of the run that `checkpoint` belongs to, or None (a foreign file, e.g. an official .pth).

    Looked for in the path itself when it is a run directory (`runs/finetune`), beside a weights file
    (`runs/finetune/best.safetensors`), and above a `checkpoints/` folder
    (`runs/pretrain/checkpoints/step_0000500[/model.safetensors]`).
    """
    path = Path(checkpoint).expanduser()
    folders = [path] if path.is_dir() else []
    folders.append(path.parent)
    for folder in list(folders):
        if folder.parent.name == "checkpoints":  # .../checkpoints/step_N -> the run directory
            folders.append(folder.parent.parent)
    for folder in folders:
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def run_metadata(cfg: DictConfig) -> dict[str, str]:
    """What an exported weights file carries of its run (read back by `read_run_config`): the model section,
    data.mean/std/crop_pct/interpolation and a fine-tuning run's resolution, as JSON under `RUN_METADATA`."""
    data = OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else {}
    run = {"model": OmegaConf.to_container(cfg.model, resolve=True),
           "data": {k: data[k] for k in RUN_DATA_KEYS if k in data}, "resolution": cfg.get("resolution")}
    return {RUN_METADATA: json.dumps(run)}


def read_run_config(checkpoint: str | os.PathLike) -> tuple[dict, str] | None:
    """(the settings of the run `checkpoint` comes from, where they were read), or None for a foreign file.

    An exported `.safetensors` file says it in its own metadata (`run_metadata`); otherwise the run's
    config.yaml (`find_run_config`). ConfigError when either is there but unreadable.
    """
    path = Path(checkpoint).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        text = read_metadata(path).get(RUN_METADATA)
        if text is not None:
            try:
                return json.loads(text), f"the metadata of {path}"
            except ValueError as e:
                raise CheckpointError(f"the run settings in the metadata of {path} are not readable JSON ({e}); "
                                      "describe the model with model.* keys of a copy without them.") from None
    found = find_run_config(checkpoint)
    if found is None:
        return None
    try:
        return yaml.safe_load(found.read_text(encoding="utf-8")), str(found)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the run config {found} that belongs to the checkpoint ({e}); fix or "
                          "remove that file, or pass the weights file from another folder.") from None


def run_value(checkpoint: str | os.PathLike, dotted: str, default=None):
    """The value of a dotted key (`model.mask_ratio`) in the settings of the checkpoint's run (`read_run_config`),
    else `default` (a foreign file, or a run without that key)."""
    found = read_run_config(checkpoint)
    node = found[0] if found is not None else None
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return default if node is None else node


def user_set_keys(cfg: DictConfig, argv: Sequence[str] = ()) -> set[str]:
    """Dotted keys the user chose: those that differ from the tool's defaults, plus `key=value` words of `argv`.

    The second part catches a value set explicitly to the default (`model.img_size=32` to evaluate a
    64 px run at 32 px); the first catches values from `--config` files. Flags (`--data DIR`) and
    their values are not keys.
    """
    defaults = OmegaConf.structured(OmegaConf.get_type(cfg))
    keys: set[str] = set()

    def walk(node, default, prefix: str) -> None:
        for name in node:
            here, value = prefix + str(name), node[name]
            if isinstance(value, DictConfig):
                walk(value, default[name], here + ".")
            elif _plain(value) != _plain(default[name]):
                keys.add(here)

    walk(cfg, defaults, "")
    words = iter(argv)
    for word in words:
        if word.startswith("-"):
            if "=" not in word:
                next(words, None)  # the flag's value
            continue
        key, has_value, _ = word.partition("=")
        if has_value and key.strip():
            keys.add(key.strip())
    return keys


def _plain(value):
    """A config value as plain Python (ListConfig -> list), for comparing."""
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


@dataclasses.dataclass
class FromRun:
    """What `merge_run_config` took from a checkpoint's run, and what the user gave against it."""

    checkpoint: str
    source: str  # the run's config.yaml, or "the metadata of FILE"
    taken: dict = dataclasses.field(default_factory=dict)  # dotted key -> the run's value, now in the config
    given: dict = dataclasses.field(default_factory=dict)  # dotted key -> (the run's value, the given one): differ

    def __str__(self) -> str:
        text = f"architecture from {self.source}: " + (" ".join(f"{k}={_text(v)}" for k, v in self.taken.items())
                                                       or "nothing (every key given)")
        if self.given:
            text += "; given, kept over the run's: " + ", ".join(
                f"{k}={_text(mine)} (the run: {_text(run)})" for k, (run, mine) in self.given.items())
        return text


def _text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@contextmanager
def naming_given_keys(origin: FromRun | None) -> Iterator[None]:
    """Around loading weights: a CheckpointError (weights that do not fit the model) becomes a ConfigError that
    names the model keys the user gave against the run's values (but img_size: position embeddings are resized),
    when there are such keys."""
    try:
        yield
    except CheckpointError as e:
        given = {k: v for k, v in (origin.given if origin else {}).items()
                 if k.startswith("model.") and k != "model.img_size"}
        if not given:
            raise
        keys = ", ".join(f"{k}={_text(mine)} (its run has {_text(run)})" for k, (run, mine) in given.items())
        raise ConfigError(f"the given {keys} contradicts the weights of {origin.checkpoint}: {e} Leave out "
                          f"{', '.join(given)} to take the run's value ({origin.source}).") from None


def merge_run_config(checkpoint: str | os.PathLike, cfg: DictConfig, *, user_keys: Collection[str] = (),
                     model_keys: Collection[str] | None = None, data_keys: Collection[str] = RUN_DATA_KEYS,
                     classifier: bool = False) -> tuple[DictConfig, FromRun | None]:
    """(a copy of `cfg` with the run's `model` keys and `data_keys` (`read_run_config`), what was taken).

    Precedence: the tool's defaults < the run < the keys in `user_keys`. A fine-tuning run's `resolution`
    becomes `model.img_size`. `model_keys` limits the model keys taken (None: every key `cfg.model` has);
    with `classifier`, an MAE's name is taken as its classifier's (`mae_vit_tiny_patch4` -> `vit_tiny_patch4`).
    Without run settings (a foreign checkpoint): (`cfg` unchanged, None). The result is validated.
    """
    found = read_run_config(checkpoint)
    if found is None:
        return cfg, None
    run, source = found
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict) or "name" not in run["model"]:
        log.warning("%s has no model section; describing the model from the command line only", source)
        return cfg, None
    taken = dict(run["model"])
    if run.get("resolution") is not None:  # fine-tuning at another resolution than the model's default
        taken["img_size"] = run["resolution"]
    if classifier and str(taken["name"]).startswith("mae_"):
        taken["name"] = taken["name"].removeprefix("mae_")
    data = run.get("data") if isinstance(run.get("data"), dict) else {}
    updates = [(f"model.{k}", v) for k, v in taken.items()
               if k in cfg.model and (model_keys is None or k in model_keys)]
    updates += [(f"data.{k}", data[k]) for k in data_keys if k in data and "data" in cfg]
    _refuse_interpolations(updates, source)
    out, origin = copy.deepcopy(cfg), FromRun(str(checkpoint), source)
    for key, value in updates:
        if key in user_keys:
            mine = _plain(OmegaConf.select(cfg, key))
            if mine != value:
                origin.given[key] = (value, mine)
            continue
        try:
            OmegaConf.update(out, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"the run config {source} has {key}={value!r}, which does not fit this toolkit's "
                              f"config ({type(e).__name__}); set {key}=... on the command line.") from None
        origin.taken[key] = value
    validate_config(out)
    return out, origin


def _refuse_interpolations(updates: list[tuple[str, object]], source: str) -> None:
    """A run writes its config.yaml resolved, so a `${...}` in what is taken from it was put there by hand: it could
    copy an environment variable (`oc.env`) into this run. The trust rule (`config/trust.py`) refuses it."""
    for key, value in updates:
        if "${" in json.dumps(value):
            raise ConfigError(f"the run config {source} has {key}={value!r}, an interpolation that a run does not "
                              "write (runs save their settings resolved) and that could copy an environment "
                              f"variable into this run: it is not written by a run, so it is refused. Set {key}=... "
                              "on the command line, or fix that file.")


def model_config_from_run(checkpoint: str | os.PathLike, cfg: DictConfig, *,
                          user_keys: Collection[str] = ()) -> DictConfig:
    """A copy of `cfg` whose `model` section and data.mean/std/crop_pct/interpolation come from the checkpoint's run
    (`merge_run_config`): evaluate, visualize, sweep and the exports. Keys of the run that this tool's model section
    does not know are ignored; a foreign checkpoint leaves `cfg` unchanged (the user's model.* keys describe it)."""
    out, origin = merge_run_config(checkpoint, cfg, user_keys=user_keys)
    if origin is not None:
        log.info("model settings from %s: %s", origin.source, OmegaConf.to_container(out.model))
    return out


def encoder_config_from_run(cfg: DictConfig, user_keys: Collection[str]) -> tuple[DictConfig, FromRun | None]:
    """Fine-tuning and linear probing from `cfg.checkpoint`: the encoder's architecture (`ENCODER_KEYS`, the name
    as a classifier) and data.mean/std of its run, unless given (`user_keys`); (cfg, None) without a run."""
    if cfg.checkpoint is None:
        return cfg, None
    return merge_run_config(cfg.checkpoint, cfg, user_keys=user_keys, model_keys=ENCODER_KEYS,
                            data_keys=NORMALISATION_KEYS, classifier=True)
