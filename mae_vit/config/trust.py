"""The one rule for shell commands and environment variables: never from a config file alone.

A `pipe:` data URL runs a shell command, and `${oc.env:VAR}` copies an environment variable into the
run's config.yaml. A recipe someone shared could do either; so neither is accepted unless the command
line itself carries the opt-in flag (`--allow-shell`, `--allow-env`), which no config file can set.
"""


from omegaconf import DictConfig, OmegaConf

from mae_vit.config.schema import flat_dict
from mae_vit.errors import ConfigError

TRUST_FLAGS = {
    "--allow-shell": "a `pipe:` data URL runs a shell command",
    "--allow-env": "an ${oc.env:...} value copies an environment variable into the run's config.yaml",
}


def check_trust(cfg: DictConfig, allowed: set) -> None:
    """ConfigError for a `pipe:` URL without --allow-shell or an ${oc.env:...} value without --allow-env."""
    for path, value in flat_dict(OmegaConf.to_container(cfg, resolve=False)).items():
        if not isinstance(value, str):
            continue
        if "${oc.env:" in value.replace(" ", "") and "--allow-env" not in allowed:
            flag = "--allow-env"
        elif path in ("data.train", "data.val") and any(
                part.strip().startswith("pipe:") for part in value.split("::")) and "--allow-shell" not in allowed:
            flag = "--allow-shell"
        else:
            continue
        raise ConfigError(
            f"'{path}' is {value!r}: {TRUST_FLAGS[flag]}, which a config file alone may not do (a shared recipe "
            f"could run anything). If you trust it, add {flag} to the command line.")
