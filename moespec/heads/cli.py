"""``moespec-heads``: identify functional heads, apply the controller, evaluate it (Hydra app)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from ..cli import check_overrides, fail
from ..data.tokenizer import pad_id
from ..paths import recipes_dir, resolve_inside
from .controller import MODES, HeadController
from .data import PromptEncoder, load_examples, read_jsonl
from .evaluation import evaluate
from .model_io import generate, load_model
from .plot import save_heatmap
from .scoring import image_token_id_of, score_heads
from .selection import HeadProfile, HeadSelectionConfig, select_heads

COMMANDS = ("identify", "apply", "eval")
WRITES = {
    "identify": ("controller.profile", "output.heatmap"),
    "apply": ("output.answers",),
    "eval": ("output.report",),
}


def config_dir() -> Path:
    """The app's Hydra config: ``heads/`` of the recipe tree."""
    return recipes_dir() / "heads"


def _required(cfg: DictConfig, key: str) -> str:
    value = OmegaConf.select(cfg, key)
    if value in (None, ""):
        raise ValueError(f"{key} is required for command={cfg.command}")
    if key.startswith("data.") and not Path(str(value)).expanduser().is_file():
        raise FileNotFoundError(f"{key}: JSONL file {value} does not exist")
    return str(value)


def _output(cfg: DictConfig, key: str) -> Path:
    """Where ``key`` writes: inside ``output.dir`` when it is set (else as given)."""
    value = Path(str(OmegaConf.select(cfg, key))).expanduser()
    root = OmegaConf.select(cfg, "output.dir")
    if root in (None, ""):
        return value
    try:
        return resolve_inside(root, value)
    except ValueError as err:
        raise ValueError(f"{key}: {err} (output.dir)") from None


def _markers(cfg: DictConfig) -> tuple[str, str]:
    markers = list(cfg.data.span_markers)
    if len(markers) != 2 or not all(markers):
        raise ValueError(f"data.span_markers must be two non-empty strings, got {markers}")
    return markers[0], markers[1]


def _load(cfg: DictConfig, attn: str | None) -> tuple[torch.nn.Module, PromptEncoder]:
    model, processor = load_model(
        cfg.model.dir,
        gguf_file=cfg.model.gguf_file,
        dtype=cfg.model.dtype,
        attn_implementation=attn,
    )
    return model, PromptEncoder(
        processor, chat_template=cfg.prompt.chat_template, system=cfg.prompt.system
    )


def identify(cfg: DictConfig) -> dict[str, Any]:
    """Score heads on the calibration data, select them, write the profile JSON and heat map."""
    examples = load_examples(_required(cfg, "data.calibration"), _markers(cfg), cfg.data.limit)
    selection = HeadSelectionConfig.from_dict(OmegaConf.to_container(cfg.selection))
    model, encoder = _load(cfg, "eager")
    image_token_id = cfg.image_token_id
    if image_token_id is None:
        image_token_id = getattr(encoder.processor, "image_token_id", None) or image_token_id_of(
            model
        )
    inputs = (
        encoder.encode(ex, with_span=ex.image is None)
        for ex in tqdm(
            examples, desc="identify", disable=not (cfg.progress and sys.stderr.isatty())
        )
    )
    t0 = time.perf_counter()
    scores = score_heads(model, inputs, image_token_id=image_token_id)
    seconds = time.perf_counter() - t0
    profile = select_heads(
        scores,
        selection,
        model_type=str(getattr(model.config, "model_type", "unknown")),
        metadata={
            "model_dir": str(cfg.model.dir),
            "gguf_file": cfg.model.gguf_file,
            "calibration": str(cfg.data.calibration),
            "samples": len(examples),
            "seconds_per_sample": seconds / len(examples),
        },
    )
    profile_path = profile.save(_output(cfg, "controller.profile"))
    heatmap = save_heatmap(profile, _output(cfg, "output.heatmap"))
    summary = {
        "profile": str(profile_path),
        "heatmap": str(heatmap),
        "samples": len(examples),
        "seconds_per_sample": round(seconds / len(examples), 4),
        "perception": len(profile.heads["perception"]),
        "reasoning": len(profile.heads["reasoning"]),
        "heads": profile.num_layers * profile.num_heads,
    }
    print(json.dumps(summary))
    return summary


def _profile_and_mode(cfg: DictConfig) -> tuple[HeadProfile, str]:
    if cfg.controller.mode not in MODES:
        raise ValueError(f"controller.mode={cfg.controller.mode!r}; valid: {', '.join(MODES)}")
    path = _output(cfg, "controller.profile")
    if not path.is_file():
        raise FileNotFoundError(
            f"controller.profile: head profile {cfg.controller.profile} does not exist "
            "(command=identify writes one)"
        )
    return HeadProfile.load(path), cfg.controller.mode


def apply(cfg: DictConfig) -> dict[str, Any]:
    """Generate answers with the controller and write them as JSONL."""
    examples = load_examples(_required(cfg, "data.input"), _markers(cfg), cfg.data.limit)
    profile, mode = _profile_and_mode(cfg)
    model, encoder = _load(cfg, None)
    tokenizer = encoder.tokenizer
    pad = pad_id(tokenizer)
    out_path = _output(cfg, "output.answers")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as out, HeadController(model, profile, mode=mode):
        for ex in tqdm(examples, desc="apply", disable=not (cfg.progress and sys.stderr.isatty())):
            ids = generate(model, encoder.encode(ex), cfg.generation.max_new_tokens, pad)
            record = {"source": ex.source, "question": ex.question, "output": encoder.decode(ids)}
            out.write(json.dumps(record) + "\n")
    summary = {"answers": str(out_path), "items": len(examples), "mode": mode}
    print(json.dumps(summary))
    return summary


def evaluate_command(cfg: DictConfig) -> dict[str, Any]:
    """Accuracy and latency with and without the controller; writes a JSON report."""
    path = _required(cfg, "data.benchmark")
    examples, failures = read_jsonl(path, _markers(cfg), cfg.data.limit)
    profile, mode = _profile_and_mode(cfg)
    model, encoder = _load(cfg, None)
    report = evaluate(
        model,
        encoder,
        examples,
        profile,
        mode=mode,
        max_new_tokens=cfg.generation.max_new_tokens,
        failures=failures,
        progress=cfg.progress,
    )
    report["benchmark"] = str(path)
    out_path = _output(cfg, "output.report")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(report["table"])
    print(f"items: {report['total']}, scored: {report['scored']}, failed: {report['failed']}")
    for failure in report["failures"]:
        print(f"  failed: {failure['reason']}")
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on ``cfg.command``."""
    if cfg.command not in COMMANDS:
        raise ValueError(f"command={cfg.command!r}; valid: {', '.join(COMMANDS)}")
    for key in WRITES[cfg.command]:  # refused before any work is done
        _output(cfg, key)
    handler = {"identify": identify, "apply": apply, "eval": evaluate_command}[cfg.command]
    return handler(cfg)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        fail(err)


def main() -> None:
    """Entry point of ``moespec-heads``: bad input ends with one ``error:`` line (exit 2)."""
    check_overrides(sys.argv[1:], config_dir(), "config")
    _hydra_main()


if __name__ == "__main__":
    main()
