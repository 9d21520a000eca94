"""Checks and views of a config built from the schema (`schema.py`): each key's own check and the
combinations (`validate_config`), the leaves of a schema, values written as on the command line, and a
nested config as {dotted key: value}."""

import dataclasses
import math
from typing import Any, Dict, Iterator, Tuple

from omegaconf import DictConfig, OmegaConf

from mae_vit.errors import ConfigError


def leaf_fields(cls: type, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every value of a schema, section by section."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            yield from leaf_fields(f.type, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def format_value(value: Any) -> str:
    """A value the way it would be written on the command line: null, true, [0.9, 0.95]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def quote(value: Any) -> str:
    """Like _format_value, but strings in quotes so that a wrong word stands out in a message."""
    return repr(value) if isinstance(value, str) else format_value(value)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value that has the right type but makes no sense.

    Every number must be finite; each key's own check (allowed choices, ranges) comes from its schema
    field; then the combinations:
    len(mean) == len(std) == model.in_chans, warmup_epochs <= epochs.
    """
    for path, f in leaf_fields(OmegaConf.get_type(cfg)):
        value, check = OmegaConf.select(cfg, path), f.metadata.get("check")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{path}' is {quote(value)}, but it must be a finite number.")
        if check is not None and not check[0](value):
            raise ConfigError(f"config key '{path}' is {quote(value)}, but it must be {check[1]}.")
    _check_combinations(cfg)


def _check_combinations(cfg: DictConfig) -> None:
    if "data" in cfg and cfg.data.mean is not None and cfg.data.std is not None:
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
            f"optim.warmup_epochs ({format_value(cfg.optim.warmup_epochs)}) is longer than optim.epochs "
            f"({cfg.optim.epochs}); the warmup must fit in the schedule. Lower optim.warmup_epochs or raise "
            "optim.epochs."
        )


def flat_dict(tree: dict, prefix: str = "") -> Dict[str, Any]:
    """A nested config as {dotted key: value}."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
