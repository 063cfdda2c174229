"""Where moespec finds its recipes and keeps its build caches."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The source checkout holding this package, when running from one."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "recipes").is_dir() else None


def recipes_dir() -> Path:
    """The Hydra recipe tree: ``$MOESPEC_RECIPES``, the checkout's ``recipes/`` or the packaged copy."""
    env = os.environ.get("MOESPEC_RECIPES")
    if env:
        return Path(env).expanduser().resolve()
    root = repo_root()
    if root is not None:
        return root / "recipes"
    return _PACKAGE / "recipes"


def torch_extensions_dir() -> Path:
    """Cache for DeepSpeed's JIT-built ops: the checkout's ignored ``build/`` or the user cache."""
    root = repo_root()
    if root is not None:
        return root / "build" / "torch_extensions"
    return (
        Path(os.environ.get("MOESPEC_CACHE", Path.home() / ".cache" / "moespec"))
        / "torch_extensions"
    )


def resolve_inside(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative paths taken from ``root``) resolved, links followed; ``ValueError``
    when it lies outside ``root``."""
    base = Path(root).expanduser().resolve()
    target = (base / Path(path).expanduser()).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{path} is outside {base}: refusing to write there")
    return target


def default_cache_dir() -> Path:
    """``$MOESPEC_CACHE`` or ``~/.cache/moespec``."""
    env = os.environ.get("MOESPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moespec"
