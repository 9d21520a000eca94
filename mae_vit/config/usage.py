"""What a tool tells its user about its keys: the --help text, the keys of a schema, the words for a type,
and the closest valid keys or flags to a wrong one (for the one-paragraph errors of `cli.py`)."""

import dataclasses
import difflib
import functools
import textwrap
import typing
from typing import Any, Dict, Iterator, List, Tuple

from omegaconf import OmegaConf

from mae_vit.config.checks import format_value, leaf_fields
from mae_vit.config.trust import TRUST_FLAGS


@dataclasses.dataclass(frozen=True)
class Key:
    path: str        # dotted key, e.g. "optim.lr"
    type: Any        # annotation, e.g. Optional[float]
    help: str        # the field's --help text


def _sections(cls: type, prefix: str = "") -> Iterator[Tuple[str, type]]:
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            yield prefix + f.name, f.type
            yield from _sections(f.type, f"{prefix}{f.name}.")


@functools.lru_cache(maxsize=None)
def schema_keys(schema_cls: type) -> Tuple[Dict[str, Key], Dict[str, str]]:
    """Leaf keys of a schema ({path: Key}) and its sections ({path: the first line of its docstring})."""
    leaves = {path: Key(path, f.type, f.metadata.get("help", "")) for path, f in leaf_fields(schema_cls)}
    sections = {path: (cls.__doc__ or "").strip().split("\n")[0] for path, cls in _sections(schema_cls)}
    return leaves, sections


def describe_type(annotation: Any) -> str:
    """Human words for a field type, used in wrong-type messages: 'an integer or null'."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return describe_type(inner) + " or null"
    if typing.get_origin(annotation) in (list, List):
        return "a list of " + describe_type(args[0]).split(" ", 1)[1] + "s"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        annotation, str(annotation)
    )


def suggest(wrong: str, valid: List[str]) -> List[str]:
    """Up to three valid keys closest to `wrong`: whole dotted path first, then the last component alone."""
    close = difflib.get_close_matches(wrong, valid, n=3, cutoff=0.6)
    if not close:
        leaf = wrong.rsplit(".", 1)[-1]
        leaf_names = sorted({v.rsplit(".", 1)[-1] for v in valid})
        near = set(difflib.get_close_matches(leaf, leaf_names, n=3, cutoff=0.75))
        close = [v for v in valid if v.rsplit(".", 1)[-1] in near][:3]
    return close


def did_you_mean(wrong: str, valid: List[str]) -> str:
    close = suggest(wrong, valid)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def unknown_flag_message(name: str, flags: Dict[str, Tuple[str, str]]) -> str:
    known = ["--config", *flags, *TRUST_FLAGS, "--help"]
    message = f"unknown flag '{name}'."
    as_key = name.lstrip("-").replace("-", "_")
    if "." in as_key or as_key in {k for k, _ in flags.values()}:
        message += f" Config keys are written without dashes: {as_key}=VALUE."
    else:
        message += did_you_mean(name, known)
    return message + f" Flags of this tool: {', '.join(known)}. Run with --help to list every key."


def format_help(schema_cls: type, prog: str = "tool") -> str:
    """The --help text: usage, the tool's flags, then every key with its default and its help."""
    flags: Dict[str, Tuple[str, str]] = dict(getattr(schema_cls, "FLAGS", {}))
    defaults = OmegaConf.structured(schema_cls)
    leaves, sections = schema_keys(schema_cls)
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
