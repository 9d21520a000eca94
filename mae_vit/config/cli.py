"""The command line of every tool: defaults < YAML files (--config) < key=value and flags, checked on the way.

`parse_config(PretrainConfig, argv)` builds a struct-mode OmegaConf `DictConfig` from a tool's
schema (`mae_vit.config`) and checks every key, type and value, so that a typo is reported as a
one-paragraph `ConfigError` naming the key and the closest valid keys instead of a traceback deep in
training. `run_tool` turns such errors into `error: ...` and exit status 2. Each field's --help text
and check live next to it in the schema (`schema.key`).
"""

import dataclasses
import difflib
import functools
import os
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mae_vit.config.checks import format_value, leaf_fields, quote, validate_config
from mae_vit.config.trust import TRUST_FLAGS, allowed_flags, check_trust
from mae_vit.errors import EXIT_STOPPED, ConfigError, NonFiniteLossError, StoppedBySignal, UserError
from mae_vit.files import expand_path, write_text


@dataclasses.dataclass(frozen=True)
class _Key:
    path: str        # dotted key, e.g. "optim.lr"
    type: Any        # annotation, e.g. Optional[float]
    help: str        # the field's --help text


def _sections(cls: type, prefix: str = "") -> Iterator[Tuple[str, type]]:
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            yield prefix + f.name, f.type
            yield from _sections(f.type, f"{prefix}{f.name}.")


@functools.lru_cache(maxsize=None)
def _schema_keys(schema_cls: type) -> Tuple[Dict[str, _Key], Dict[str, str]]:
    """Leaf keys of a schema ({path: _Key}) and its sections ({path: the first line of its docstring})."""
    leaves = {path: _Key(path, f.type, f.metadata.get("help", "")) for path, f in leaf_fields(schema_cls)}
    sections = {path: (cls.__doc__ or "").strip().split("\n")[0] for path, cls in _sections(schema_cls)}
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
    leaves, _ = _schema_keys(schema_cls)
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
    known = ["--config", *flags, *TRUST_FLAGS, "--help"]
    message = f"unknown flag '{name}'."
    as_key = name.lstrip("-").replace("-", "_")
    if "." in as_key or as_key in {k for k, _ in flags.values()}:
        message += f" Config keys are written without dashes: {as_key}=VALUE."
    else:
        message += _did_you_mean(name, known)
    return message + f" Flags of this tool: {', '.join(known)}. Run with --help to list every key."


def format_help(schema_cls: type, prog: str = "tool") -> str:
    """The --help text: usage, the tool's flags, then every key with its default and its help."""
    flags: Dict[str, Tuple[str, str]] = dict(getattr(schema_cls, "FLAGS", {}))
    defaults = OmegaConf.structured(schema_cls)
    leaves, sections = _schema_keys(schema_cls)
    usage = " ".join(f"[{flag} {metavar}]" for flag, (_, metavar) in flags.items())
    lines = [f"usage: {prog} [-h] [--config FILE] {usage} [key=value ...]", ""]
    if schema_cls.__doc__:
        lines += [textwrap.dedent(schema_cls.__doc__).strip().split("\n\n")[0], ""]
    lines += [
        "Settings are the defaults below, then a YAML file (--config), then key=value overrides with",
        "dotted keys and YAML values (optim.betas=[0.9,0.95], model.num_classes=null); later ones win.",
        "",
        "flags:",
        f"  {'-h, --help':<24}show this help and exit",
        f"  {'--config FILE':<24}YAML file with any of the keys below, nested by section",
        f"  {'--allow-shell':<24}accept pipe: data URLs (they run a shell command; never from a file alone)",
        f"  {'--allow-env':<24}accept ${{oc.env:VAR}}, other resolvers, $VARs in paths from files (they read the "
        "environment)",
    ]
    lines += [f"  {flag + ' ' + metavar:<24}same as {key}=..." for flag, (key, metavar) in flags.items()]
    lines += ["", "keys (default, then meaning):"]
    width = max(len(f"{k} = {format_value(OmegaConf.select(defaults, k))}") for k in leaves) + 2

    def key_line(path: str) -> str:
        setting = f"{path} = {format_value(OmegaConf.select(defaults, path))}"
        return f"  {setting:<{width}}{leaves[path].help}".rstrip()

    for section, comment in sections.items():
        lines.append(f"{section}:" + (f"  ({comment})" if comment else ""))
        lines += [key_line(p) for p in leaves if p.rsplit(".", 1)[0] == section]
    top_level = [p for p in leaves if "." not in p]
    if top_level and sections:
        lines.append("top-level keys:")
    lines += [key_line(p) for p in top_level]
    return "\n".join(lines)


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
