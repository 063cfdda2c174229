"""What moespec's command-line programs share: bad input ends with one ``error:`` line, exit 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

#: Hydra flags under which the overrides are still checked before the run (a sweep is checked
#: with the first value of each swept key).
_CHECKED_FLAGS = ("-m", "--multirun")


def prepare_environment() -> None:
    """Before DeepSpeed is imported: its JIT ops cached in moespec's build or cache directory,
    no accelerator guess when the machine has no GPU (it warns on every command) and no
    compiler probe lines (DeepSpeed checks for libaio, logged at INFO), no progress bars when
    stderr is not a terminal (set before torch is imported: torch imports tqdm, which reads
    ``TQDM_DISABLE`` once)."""
    from .paths import torch_extensions_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    if not sys.stderr.isatty():  # a log file, not a terminal: no progress-bar frames in it
        os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm on import: child processes
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("compilers").setLevel(logging.WARNING)


def override_key(override: str) -> str:
    """The key a command-line override sets: ``+model.overrides.x=1`` → ``model.overrides.x``."""
    return override.lstrip("+~").split("=", 1)[0]


def fail(error: BaseException | str) -> NoReturn:
    """Print ``error: ...`` on stderr and exit with status 2."""
    print(f"error: {one_line(str(error))}", file=sys.stderr)
    sys.exit(2)


def one_line(message: str) -> str:
    """Hydra's multi-line composition error as one line (keeps the key and the valid options)."""
    lines = [ln.strip() for ln in message.splitlines()]
    cut = next((i for i, ln in enumerate(lines) if ln.startswith("Available options")), None)
    skip = ("full_key", "object_type", "reference_type", "To append")
    head = [ln for ln in lines[: min(cut or 4, 4)] if ln and not ln.startswith(skip)]
    if cut is not None:
        options = []
        for ln in lines[cut + 1 :]:
            if not ln or ln.startswith("Config search path"):
                break
            options.append(ln)
        head.append("valid: " + ", ".join(options))
    return " ".join(head)


def _first_of_each_sweep(overrides: list[str]) -> list[str]:
    """``a=1,2`` → ``a=1``: one job's overrides out of a sweep's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not parsed.is_sweep_override():
            out.append(text)
            continue
        try:
            value = next(iter(parsed.sweep_string_iterator()))
        except Exception:  # glob() and others need Hydra's config loader: left to Hydra
            continue
        out.append(f"{parsed.get_key_element()}={value}")
    return out


def _valid_keys_hint(error: BaseException) -> str:
    """For an unknown key of a structured config: the keys that node has."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    unknown = (ConfigKeyError, ConfigAttributeError)
    cause = error if isinstance(error, unknown) else error.__cause__
    node = getattr(cause, "object_type", None)
    if not isinstance(cause, unknown) or node is None:
        return ""
    try:
        keys = list(OmegaConf.structured(node).keys())
    except Exception:  # not a structured config
        return ""
    return f"(valid keys: {', '.join(keys)})" if keys else ""


def check_overrides(argv: list[str], config_dir: Path, config_name: str) -> Any:
    """Compose the config once with the command line's overrides; exit 2 on a bad one.

    Returns the composed config (``None`` where the check was left to Hydra: ``--help``,
    ``--cfg`` and the other flags; ``hydra.*`` overrides are left out of it).
    """
    if any(a.startswith("-") and a not in _CHECKED_FLAGS for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    sweep = any(a in _CHECKED_FLAGS for a in argv)
    overrides = [a for a in argv if a not in _CHECKED_FLAGS]
    overrides = [a for a in overrides if not a.lstrip("+~").startswith("hydra.")]
    try:
        if sweep:
            overrides = _first_of_each_sweep(overrides)
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ or err.__context__
        new = (
            cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in str(err)
        )
        detail = one_line(str(cause)) if new else ""
        fail(f"{one_line(str(err))} {detail} {_valid_keys_hint(err)}".strip())
    _check_added_keys(cfg, overrides)
    return cfg


def _check_added_keys(cfg: object, overrides: list[str]) -> None:
    """``+key=value`` adds a key anywhere; under a typed (dataclass) node it must be a field."""
    import dataclasses

    from omegaconf import OmegaConf

    for text in overrides:
        if not text.startswith("+"):
            continue
        key = text.lstrip("+").split("=", 1)[0]
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        kind = OmegaConf.get_type(node) if OmegaConf.is_config(node) else None
        if kind is not None and dataclasses.is_dataclass(kind):
            valid = [f.name for f in dataclasses.fields(kind)]
            if leaf not in valid:
                fail(
                    f"Could not add '{key}': '{leaf}' is not a field of '{kind.__name__}' "
                    f"(valid keys: {', '.join(valid)})"
                )
