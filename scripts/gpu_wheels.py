"""The wheelhouse the GPU check needs on the device machine (Python 3.12, x86-64), in ``.whl/``.

What the device image lacks, at the versions installed here (so they co-install as they do
here): DeepSpeed, Hydra, OmegaConf, datasets, wandb and every package they need that the image
does not hold, plus moespec itself; transformers, huggingface-hub and tokenizers too, since
moespec needs newer ones than the image's. Wheels come from PyPI for CPython 3.12 on manylinux
x86-64; the packages PyPI has only as source (DeepSpeed: its ops are left to JIT) are built
here. The total must stay within the 64 MiB that may travel; it is printed, and packages that
do not fit can be left out with ``--skip`` (the check then skips the parts that need them).

    bash scripts/gpu_wheels.sh [--dry-run] [--skip wandb]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("deepspeed", "hydra-core", "datasets", "wandb", "transformers")
#: what the device image holds already (its package list), by normalised name
_IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click cloudpickle cmake colorama contourpy cuda-bindings cycler
cython einops filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py hf-xet
httpcore httpx idna imageio iniconfig jinja2 joblib kiwisolver markdown markdown-it-py
markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx ninja numpy
nvidia-ml-py opt-einsum packaging pandas pathspec peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pygments pyparsing pytest
python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece setuptools
shellingham simplejson six sympy tabulate tiktoken toolz torch tqdm triton typer
typing-extensions urllib3 wheel wrapt xxhash yarl zipp
"""
IMAGE = set(_IMAGE_PACKAGES.split())
#: carried although the image has them: moespec needs the versions installed here
NEWER = {"transformers", "huggingface-hub", "tokenizers"}
SOURCE_ONLY = {"deepspeed", "antlr4-python3-runtime"}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014", "manylinux1"):
    PLATFORM += ["--platform", f"{tag}_x86_64"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: str) -> list[str]:
    """The packages ``dist`` needs (extras and environment-only markers left out)."""
    out = []
    for req in metadata.requires(dist) or []:
        if "extra ==" in req or 'platform_system == "Windows"' in req:
            continue
        out.append(normalise(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return out


def carried(roots: tuple[str, ...] = ROOTS, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{name: version}`` of every package to carry: ``roots`` and what they need, as
    installed here, less what the image holds (:data:`NEWER` carried anyway) and ``skip``."""
    found: dict[str, str] = {}
    todo = [normalise(r) for r in roots if normalise(r) not in skip]
    while todo:
        name = todo.pop()
        if name in found or name in skip or (name in IMAGE and name not in NEWER):
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an optional need not installed here: not needed there either
        todo += requirements(name)
    return dict(sorted(found.items()))


def commands(packages: dict[str, str], dest: Path) -> list[list[str]]:
    """The pip commands that fill ``dest``."""
    py = sys.executable
    binary = [f"{n}=={v}" for n, v in packages.items() if n not in SOURCE_ONLY]
    source = [f"{n}=={v}" for n, v in packages.items() if n in SOURCE_ONLY]
    cmds = [[py, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(dest), *binary]]
    if source:
        cmds.append([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), *source])
    cmds.append([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(ROOT)])
    return cmds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    p.add_argument("--skip", default="", help="comma-separated packages to leave out")
    p.add_argument("--dry-run", action="store_true", help="print the pip commands only")
    args = p.parse_args(argv)
    skip = tuple(normalise(s) for s in args.skip.split(",") if s)
    packages = carried(skip=skip)
    for cmd in commands(packages, args.dest):
        print(" ".join(cmd), flush=True)
        if not args.dry_run:
            args.dest.mkdir(parents=True, exist_ok=True)
            subprocess.run(cmd, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    if not args.dry_run:
        sizes = {w.name: w.stat().st_size for w in args.dest.glob("*.whl")}
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:8]:
            print(f"{size / 2**20:7.1f} MiB  {name}")
        total = sum(sizes.values()) / 2**20
        print(f"{total:.1f} MiB in {len(sizes)} wheels (the limit that may travel: 64 MiB)")
        return 0 if total <= 64 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
