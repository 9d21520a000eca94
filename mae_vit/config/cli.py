"""The command line of every tool: defaults < YAML files (--config) < key=value and flags, checked on the way.

`parse_config(PretrainConfig, argv)` builds a struct-mode OmegaConf `DictConfig` from a tool's
schema (`mae_vit.config`) and checks every key, type and value, so that a typo is reported as a
one-paragraph `ConfigError` naming the key and the closest valid keys instead of a traceback deep in
training. `run_tool` turns such errors into `error: ...` and exit status 2. Each field's --help text
and check live next to it in the schema (`schema.key`).
"""

import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mae_vit.config.checks import quote, validate_config
from mae_vit.config.trust import TRUST_FLAGS, allowed_flags, check_trust
from mae_vit.config.usage import Key, describe_type, did_you_mean, format_help, schema_keys, unknown_flag_message
from mae_vit.errors import EXIT_STOPPED, ConfigError, NonFiniteLossError, StoppedBySignal, UserError
from mae_vit.files import expand_path, write_text


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


def _typed_value(text: str, key: str, leaves: Dict[str, Key]) -> Any:
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


def _flatten(data: Dict[Any, Any], leaves: Dict[str, Key], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Nested YAML mapping -> (dotted key, value) pairs; mappings under a leaf key stay whole (and fail later)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in leaves:
            yield from _flatten(value, leaves, path + ".")
        else:
            yield path, value


def _set(cfg: DictConfig, schema_cls: type, key: str, value: Any, source: str) -> None:
    """Set one dotted key, turning unknown keys and wrong types into a ConfigError naming `source`."""
    leaves, sections = schema_keys(schema_cls)
    if key in sections:
        raise ConfigError(
            f"'{key}' ({source}) is a section, not a value; set its keys instead, e.g. "
            f"{next(p for p in leaves if p.startswith(key + '.'))}=... Run with --help to list every key."
        )
    if key not in leaves:
        raise ConfigError(
            f"unknown config key '{key}' ({source}).{did_you_mean(key, list(leaves))} "
            "Run with --help to list every key."
        )
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException:
        raise ConfigError(
            f"config key '{key}' ({source}) must be {describe_type(leaves[key].type)}, "
            f"but got {quote(value)}. Run with --help to see every key with its default."
        ) from None


def parse_config(schema_cls: type, argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> DictConfig:
    """Build a validated, struct-mode config for one tool from its schema and the command line.

    `argv` (default sys.argv[1:]) holds, in any order:
      --config FILE         YAML file merged over the defaults (may be repeated; later files win)
      key=value             dotted key; the value is typed by the key: text for string keys (mixed_precision=no),
                            YAML for the rest: optim.betas=[0.9,0.95], model.num_classes=null
      --flag VALUE          a shorthand from schema_cls.FLAGS, e.g. --output-dir DIR; also --flag=VALUE
      --allow-shell         accept `pipe:` data URLs (they run a shell command)
      --allow-env           accept ${oc.env:VAR} (and other resolvers but oc.select) and $VARs in paths from
                            config files (they copy an environment variable into the config)
      -h / --help           print every flag and key with default and meaning, then exit 0
    Precedence: defaults < YAML files < command-line keys and flags (which apply left to right).
    Nothing from a config file alone runs a command or reads the environment: the two --allow flags
    exist only on the command line.
    Any mistake raises ConfigError with one paragraph naming the key, flag or file at fault.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    flags: Dict[str, Tuple[str, str]] = dict(getattr(schema_cls, "FLAGS", {}))
    prog = prog or os.path.basename(sys.argv[0]) or "tool"
    if "-h" in argv or "--help" in argv:
        print(format_help(schema_cls, prog))
        raise SystemExit(0)

    allowed = allowed_flags(argv)
    config_files, overrides = _split_argv([word for word in argv if word not in TRUST_FLAGS], flags)
    cfg = OmegaConf.structured(schema_cls)
    OmegaConf.set_struct(cfg, True)
    leaves, _ = schema_keys(schema_cls)
    for path in config_files:
        for key, value in _flatten(_read_yaml(path), leaves):
            _set(cfg, schema_cls, key, value, f"in config file '{path}'")
    for key, text, source in overrides:
        _set(cfg, schema_cls, key, _typed_value(text, key, leaves), source)
    # ${...} resolved, then `~`, $VARS, relative paths made absolute, before anything reads or writes them
    check_trust(cfg, allowed, typed={key for key, _, _ in overrides})
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
                raise ConfigError(unknown_flag_message(name, flags))
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


def save_config(cfg: Any, path: "str | os.PathLike[str]") -> None:
    """Write the resolved config as YAML, atomically (`files.write_text`).

    A crash mid-write never leaves a truncated file; an existing file at `path` is replaced only by a
    complete new one. The file can be read back with `parse_config(Schema, ["--config", path])`.
    """
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def run_tool(main_fn: Callable[[List[str]], Any], argv: Optional[List[str]] = None) -> Any:
    """Call `main_fn(argv)` (argv defaults to sys.argv[1:]) and return its result.

    A `mae_vit.errors.UserError` (bad config, data path, checkpoint) is printed to stderr as one
    paragraph, `error: <message>` wrapped to 100 columns, and the process exits with status 2.
    A `NonFiniteLossError` (training diverged) is printed the same way with exit status 1. A run
    stopped by SIGTERM / SIGUSR1 (`StoppedBySignal`, after saving a checkpoint) exits with status 75, so
    that `pretrain && finetune` does not go on and schedulers see an unfinished job; Ctrl-C exits with
    status 130 after a short note. Other exceptions are bugs: they propagate with
    their traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main_fn(argv)
    except UserError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(textwrap.fill(f"error: {message}", width=100, break_on_hyphens=False, break_long_words=False),
              file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:  # a training failure, not a bug: say what happened, exit 1
        print(textwrap.fill(f"error: {e}", width=100, break_on_hyphens=False), file=sys.stderr)
        sys.exit(1)
    except StoppedBySignal as e:
        print(textwrap.fill(f"stopped: {e}", width=100, break_on_hyphens=False), file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); the last saved checkpoint is kept.", file=sys.stderr)
        sys.exit(130)
