"""The one rule for shell commands and environment variables: never from a config file alone.

A `pipe:` data URL runs a shell command; `${oc.env:VAR}` (and a resolver that can build one, like
`oc.decode`) and a `$VAR` in a path copy an environment variable into the run's config.yaml. A recipe
someone shared could do either; so neither is accepted unless the command line itself carries the
opt-in flag (`--allow-shell`, `--allow-env`), which no config file can set. `check_trust` applies the
rule to the values as the tools use them (after interpolation, decoding and path expansion), for every
key that reaches a shard opener, whether it came from a config file, the command line or a run's
config.yaml.
"""

from __future__ import annotations

from typing import Collection, Dict, Iterator, Tuple

from braceexpand import braceexpand
from omegaconf import DictConfig, OmegaConf, grammar_parser
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from mae_vit.config.paths import URL_KEYS, environment_names, resolve_paths
from mae_vit.errors import ConfigError

TRUST_FLAGS = {
    "--allow-shell": "a `pipe:` data URL runs a shell command",
    "--allow-env": "an ${oc.env:...} value, a resolver that can build one, or a $VAR in a path copies an "
                   "environment variable into the run's config.yaml",
}
# Resolvers that only read other keys of the config: accepted without --allow-env.
SAFE_RESOLVERS = ("oc.select",)


def allowed_flags(argv: Collection[str]) -> set:
    """The trust flags given on a command line."""
    return {word for word in argv if word in TRUST_FLAGS}


def check_trust(cfg: DictConfig, allowed: Collection[str], typed: Collection[str] = ()) -> None:
    """Apply the trust rule to `cfg` and resolve it in place: ${...} interpolations, then paths (`resolve_paths`).

    `allowed`: the trust flags on the command line; `typed`: keys whose values the user typed there (their
    `$VAR`s are the user's own). ConfigError, naming the key, its value and the flag, for
      - a resolver other than SAFE_RESOLVERS (found by OmegaConf's own grammar: blanks and nesting hide
        none) without --allow-env;
      - a value that is still an interpolation once resolved (an escaped \\${...} becomes one);
      - a `$VAR` in a path from anywhere but the command line, without --allow-env;
      - a `pipe:` URL among the brace-expanded parts of a shard spec (`URL_KEYS`) once every path is
        expanded, without --allow-shell.
    """
    raw = dict(_strings(cfg))
    if "--allow-env" not in allowed:
        for key, value in raw.items():
            unsafe = [name for name in _resolvers(value) if name not in SAFE_RESOLVERS]
            if unsafe:
                does = "copies" if unsafe[0] == "oc.env" else "could build an ${oc.env:...} that copies"
                _refuse(key, value, None, "--allow-env", f"the resolver `{unsafe[0]}` {does} an environment variable "
                        f"into the run's config.yaml (only ${{key}} references and {', '.join(SAFE_RESOLVERS)} are "
                        "accepted without a flag)")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve an ${{...}} interpolation in the config: {' '.join(str(e).split())}") \
            from None
    resolved = dict(_strings(cfg))
    for key, value in resolved.items():
        if "${" in value:
            raise ConfigError(f"'{key}' is {value!r} (from {raw.get(key)!r}) once resolved, which OmegaConf would "
                              "read again as an interpolation: an escaped \\${...} is not accepted. Write the "
                              "value without it.")
        names = environment_names(key, value)
        if names and "--allow-env" not in allowed and not (key in typed and raw.get(key) == value):
            _refuse(key, value, raw.get(key), "--allow-env", f"expanding it copies the environment variable(s) "
                    f"{', '.join(names)} into the run's config.yaml")
    resolve_paths(cfg)
    if "--allow-shell" not in allowed:
        for key in URL_KEYS:
            value = OmegaConf.select(cfg, key, default=None)
            if isinstance(value, str) and any(url.strip().lower().startswith("pipe:") for part in value.split("::")
                                              for url in braceexpand(part.strip())):
                _refuse(key, value, raw.get(key), "--allow-shell", TRUST_FLAGS["--allow-shell"])


def _refuse(key: str, value: str, raw: str | None, flag: str, why: str) -> None:
    origin = f" (from {raw!r})" if raw is not None and "${" in raw else ""
    raise ConfigError(
        f"'{key}' is {value!r}{origin}: {why}, which a config file alone may not do (a shared recipe could run "
        f"anything). If you trust it, add {flag} to the command line.")


def _strings(cfg: DictConfig) -> Iterator[Tuple[str, str]]:
    """(dotted key, text) of every string value in `cfg`, interpolations unresolved; list items as key[i]."""
    def walk(node, path: str) -> Iterator[Tuple[str, str]]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        elif isinstance(node, str):
            yield path, node

    yield from walk(OmegaConf.to_container(cfg, resolve=False), "")


def _resolvers(value: str) -> Dict[str, None]:
    """The names of the resolvers a value calls, nested ones included, as OmegaConf parses it."""
    if "${" not in value:
        return {}
    try:
        tree = grammar_parser.parse(value)
    except GrammarParseError:
        return {}  # not an interpolation OmegaConf can resolve: resolving it fails with a clear error
    names: Dict[str, None] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            names[node.resolverName().getText().strip()] = None
        stack.extend(node.getChildren() if hasattr(node, "getChildren") else ())
    return names
