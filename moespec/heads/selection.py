"""Selecting perception and reasoning heads from their scores, and the saved head profile."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
CLASSES = ("perception", "reasoning")
Head = tuple[int, int]


@dataclass
class HeadSelectionConfig:
    """Thresholds, layer ranges and gains (paper defaults for Ocean-R1); layers count from 0.

    Perception heads: layer <= l_perc and score >= tau_perc. Reasoning heads: layer >= l_reas and
    score <= tau_reas. ``max_fraction`` caps the share of all heads selected (most extreme kept).
    """

    l_perc: int = 7
    tau_perc: float = 0.22
    l_reas: int = 3
    tau_reas: float = 0.01
    g_perc: float = 1.16
    g_reas: float = 1.30
    max_fraction: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int if f.name.startswith("l_") else float
            if value is None and f.name == "max_fraction":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"selection.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"selection.{f.name} must be a finite number, got {value!r}")
            if kind is int and value != int(value):
                raise ValueError(f"selection.{f.name} must be a whole layer index, got {value!r}")
            setattr(self, f.name, kind(value))
        for key in ("g_perc", "g_reas"):
            if not float(getattr(self, key)) >= 1.0:
                raise ValueError(
                    f"selection.{key}={getattr(self, key)} must be >= 1.0 (gains only amplify)"
                )
        if not self.tau_reas < self.tau_perc:
            raise ValueError(
                f"tau_reas={self.tau_reas} must be below tau_perc={self.tau_perc} "
                "so that no head is in both classes"
            )
        if self.max_fraction is not None and not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_fraction={self.max_fraction} must be in [0, 1] or None")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadSelectionConfig:
        """Build from a mapping; unknown keys are an error naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown selection keys {unknown}; valid: {sorted(valid)}")
        return cls(**data)


@dataclass
class HeadProfile:
    """Scores and selected heads of one model, with the gains to apply; saved as JSON."""

    model_type: str
    num_layers: int
    num_heads: int
    scores: torch.Tensor
    heads: dict[str, list[Head]]
    gains: dict[str, float]
    thresholds: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_gains(self.gains, "head profile")
        _check_heads(self.heads, (int(self.num_layers), int(self.num_heads)), "head profile")

    def gain_matrix(self) -> torch.Tensor:
        """Float32 [num_layers, num_heads] gains, 1.0 for heads that are not selected."""
        gains = torch.ones(self.num_layers, self.num_heads)
        for cls in CLASSES:
            for layer, head in self.heads.get(cls, []):
                gains[layer, head] = float(self.gains[cls])
        return gains

    def selected(self) -> list[Head]:
        """All selected heads, sorted."""
        return sorted({tuple(h) for cls in CLASSES for h in self.heads.get(cls, [])})

    def with_gains(self, **gains: float) -> HeadProfile:
        """A copy with some class gains replaced, e.g. ``with_gains(perception=1.0)``."""
        unknown = sorted(set(gains) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown head classes {unknown}; valid: {list(CLASSES)}")
        return HeadProfile(**{**self.__dict__, "gains": {**self.gains, **gains}})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        data = asdict(self)
        data["scores"] = [[round(float(v), 8) for v in row] for row in self.scores.tolist()]
        data["heads"] = {c: [list(h) for h in self.heads.get(c, [])] for c in CLASSES}
        return data

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> HeadProfile:
        """Build from :meth:`to_dict` output, checking the schema."""
        required = [f.name for f in fields(cls) if f.name not in ("metadata", "schema_version")]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}; a head profile needs {required}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{source}: schema_version {version} is not supported; valid: {SCHEMA_VERSION}"
            )
        scores = torch.tensor(data["scores"], dtype=torch.float32)
        shape = (int(data["num_layers"]), int(data["num_heads"]))
        if tuple(scores.shape) != shape:
            raise ValueError(f"{source}: scores have shape {tuple(scores.shape)}, expected {shape}")
        heads = _parse_heads(data["heads"], source)
        _check_heads(heads, shape, source)
        gains = data["gains"]
        if not isinstance(gains, dict):
            raise ValueError(f"{source}: 'gains' must be a mapping of {list(CLASSES)} to numbers")
        _check_gains(gains, source)
        return cls(
            model_type=str(data["model_type"]),
            num_layers=shape[0],
            num_heads=shape[1],
            scores=scores,
            heads=heads,
            gains={c: float(gains[c]) for c in CLASSES},
            thresholds=dict(data["thresholds"]),
            metadata=dict(data.get("metadata", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        """Read a profile written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"head profile {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"head profile {path} is not valid JSON: {err}") from err
        return cls.from_dict(data, source=str(path))


def _check_gains(gains: dict[str, Any], source: str) -> None:
    """Raise ValueError unless ``gains`` maps exactly the head classes to finite numbers >= 1."""
    missing = [c for c in CLASSES if c not in gains]
    if missing:
        raise ValueError(
            f"{source}: gains are missing the key(s) {missing}; needed: {list(CLASSES)}"
        )
    unknown = sorted(set(gains) - set(CLASSES))
    if unknown:
        raise ValueError(f"{source}: unknown gain classes {unknown}; valid: {list(CLASSES)}")
    for cls in CLASSES:
        value = gains[cls]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 1.0:
            raise ValueError(
                f"{source}: gains[{cls!r}]={value!r} must be a finite number >= 1.0 "
                "(gains only amplify)"
            )


def _parse_heads(data: Any, source: str) -> dict[str, list[Head]]:
    """``{"perception": [[layer, head], ...], ...}`` as lists of int pairs; a missing class is []."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: 'heads' must be a mapping of {list(CLASSES)} to lists")
    unknown = sorted(set(data) - set(CLASSES))
    if unknown:
        raise ValueError(f"{source}: unknown head classes {unknown}; valid: {list(CLASSES)}")
    heads = {}
    for cls in CLASSES:
        pairs = data.get(cls, [])
        ok = isinstance(pairs, list) and all(
            isinstance(p, list | tuple)
            and len(p) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
            for p in pairs
        )
        if not ok:
            raise ValueError(f"{source}: heads[{cls!r}] must be a list of [layer, head] integers")
        heads[cls] = [(int(x), int(h)) for x, h in pairs]
    return heads


def _check_heads(heads: dict[str, list[Head]], shape: tuple[int, int], source: str) -> None:
    """Raise ValueError for heads outside the grid or listed in both classes."""
    for name, hs in heads.items():
        bad = [tuple(h) for h in hs if not (0 <= h[0] < shape[0] and 0 <= h[1] < shape[1])]
        if bad:
            raise ValueError(f"{source}: {name} heads {bad} are outside {shape[0]}x{shape[1]}")
    both = sorted(
        {tuple(h) for h in heads.get(CLASSES[0], [])}
        & {tuple(h) for h in heads.get(CLASSES[1], [])}
    )
    if both:
        raise ValueError(
            f"{source}: heads {both} are listed as both perception and reasoning; "
            "a head may belong to one class only"
        )


def cap_limit(max_fraction: float, num_heads: int) -> int:
    """``floor(max_fraction * num_heads)`` in exact decimal arithmetic (0.29 * 100 is 29, not 28)."""
    return math.floor(Fraction(repr(float(max_fraction))) * num_heads)


def _cap(
    candidates: dict[str, list[Head]], scores: torch.Tensor, limit: int
) -> dict[str, list[Head]]:
    """Keep at most ``limit`` heads, split by class size (largest remainder), most extreme first."""
    total = sum(len(v) for v in candidates.values())
    if total <= limit:
        return candidates
    shares = {c: limit * len(v) / total for c, v in candidates.items()}
    quota = {c: math.floor(s) for c, s in shares.items()}
    for c in sorted(shares, key=lambda c: quota[c] - shares[c])[: limit - sum(quota.values())]:
        quota[c] += 1
    kept = {}
    for cls, heads in candidates.items():
        sign = -1.0 if cls == "perception" else 1.0
        ranked = sorted(heads, key=lambda h: (sign * float(scores[h]), h))
        kept[cls] = sorted(ranked[: quota[cls]])
    return kept


def select_heads(
    scores: torch.Tensor | list[list[float]],
    config: HeadSelectionConfig | None = None,
    *,
    model_type: str = "unknown",
    metadata: dict[str, Any] | None = None,
) -> HeadProfile:
    """Pick perception and reasoning heads from [num_layers, num_heads] scores."""
    config = config or HeadSelectionConfig()
    scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_layers, num_heads], got shape {tuple(scores.shape)}")
    layers = torch.arange(scores.shape[0])[:, None].expand_as(scores)
    perc = (layers <= config.l_perc) & (scores >= config.tau_perc)
    reas = (layers >= config.l_reas) & (scores <= config.tau_reas)
    heads = {
        "perception": [tuple(x) for x in perc.nonzero().tolist()],
        "reasoning": [tuple(x) for x in reas.nonzero().tolist()],
    }
    if config.max_fraction is not None:
        heads = _cap(heads, scores, cap_limit(config.max_fraction, scores.numel()))
    return HeadProfile(
        model_type=model_type,
        num_layers=scores.shape[0],
        num_heads=scores.shape[1],
        scores=scores,
        heads=heads,
        gains={"perception": config.g_perc, "reasoning": config.g_reas},
        thresholds=asdict(config),
        metadata=dict(metadata or {}),
    )
