"""Shared fixtures: a session cache for data/tokenizers and a runner for the training CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def moespec_cache(tmp_path_factory) -> Path:
    """One data/tokenizer cache for the whole session (built once, read by every run)."""
    return tmp_path_factory.mktemp("moespec_cache")


@pytest.fixture(scope="session")
def train_env(moespec_cache) -> dict[str, str]:
    """Environment for training subprocesses: offline wandb, shared caches, one thread."""
    launcher_vars = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"}
    # an in-process test may have set the launcher variables; a subprocess picks its own
    return {
        **{k: v for k, v in os.environ.items() if k not in launcher_vars},
        "MOESPEC_CACHE": str(moespec_cache),
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(ROOT / "build" / "torch_extensions"),
    }


@pytest.fixture(scope="session")
def torchrun2() -> list[str]:
    """``torchrun`` for 2 local ranks; ``--standalone`` binds its rendezvous port itself."""
    from moespec.train.launch import torchrun_launcher

    return torchrun_launcher(2)


@pytest.fixture(scope="session")
def run_train(train_env):
    """``run_train(args, launcher=None)``: run ``python -m moespec.train ARGS`` and return the process."""

    def run(args: list[str], *, launcher: list[str] | None = None, timeout: int = 600, env=None):
        cmd = (launcher or [sys.executable, "-m"]) + ["moespec.train", *args]
        return subprocess.run(
            cmd,
            env={**train_env, **(env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def read_metrics():
    """``read_metrics(run_dir)``: rows of ``metrics.jsonl`` (alerts excluded)."""

    def read(run_dir: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "alert" not in r]

    return read


@pytest.fixture(scope="session")
def trace_routing():
    """``with trace_routing(model) as seen:`` records, per moespec MoE layer and per token
    routed, ``(chosen experts, router scores, each chosen expert's raw output)`` by a loop."""

    @contextlib.contextmanager
    def trace(model):
        layers = [m for m in model.modules() if getattr(m, "is_moespec_moe", False)]
        seen: list[list] = [[] for _ in layers]

        def recorder(records: list, layer):
            def hook(router, args, out):
                x = args[0]
                for t in range(x.shape[0]):
                    chosen = out.idx[t].tolist()
                    ys = [layer.experts.expert_forward(e, x[t]) for e in chosen]
                    records.append((chosen, out.scores[t].tolist(), ys))

            return hook

        handles = [
            layer.router.register_forward_hook(recorder(records, layer))
            for records, layer in zip(seen, layers)
        ]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    return trace


@contextlib.contextmanager
def script_module(name: str):
    """``scripts/<name>.py`` imported as a module (its sibling ``benchlib`` importable), then
    forgotten again."""
    import importlib.util

    scripts = str(ROOT / "scripts")
    sys.path.insert(0, scripts)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(scripts)


@pytest.fixture(scope="session")
def load_script():
    """``with load_script(name) as module:`` a script of ``scripts/`` as a module."""
    return script_module
