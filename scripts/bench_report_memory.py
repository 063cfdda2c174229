"""Peak memory of ``moespec-report`` over N and 20×N tokens (statistics are counts).

    python scripts/bench_report_memory.py runs/demo/aux_only --tokens 10000 --factor 20

Writes a labelled jsonl of the embedded corpus (bible, code, prose) large enough for the big
run, then runs the report twice, each in a fresh process, and prints each one's peak resident
set size (``ru_maxrss``), the part of it above the imported libraries (torch, DeepSpeed,
transformers) and the ratios of the big run to the small one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import resource, sys
import deepspeed, torch, transformers
from moespec.report.cli import main
print("BASE_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_corpus(path: Path, chars: int) -> None:
    """Documents of the three embedded domains, round robin, until ``chars`` characters."""
    from moespec.data.corpus import bible_documents, code_documents, prose_documents

    sources = {"bible": bible_documents(), "code": code_documents(), "prose": prose_documents()}
    written = 0
    with path.open("w") as fh:
        for name in itertools.cycle(list(sources)):
            doc = next(sources[name], None)
            if doc is None:
                sources[name] = {"bible": bible_documents, "code": code_documents,
                                 "prose": prose_documents}[name]()  # fmt: skip
                continue
            fh.write(json.dumps({"text": doc, "domain": name}) + "\n")
            written += len(doc)
            if written >= chars:
                return


def measure(run_dir: Path, data: Path, tokens: int, out: Path) -> tuple[float, float, float, int]:
    """(peak RSS, peak RSS above the imported libraries (MiB), seconds, tokens routed) of one
    report over at most ``tokens`` tokens in a fresh process."""
    args = [str(run_dir), "--data", str(data), "--out", str(out), "--max-tokens", str(tokens),
            "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the report failed:\n{proc.stderr[-2000:]}")
    kb = {ln.split()[0]: int(ln.split()[1]) for ln in proc.stdout.splitlines()
          if ln.startswith(("BASE_KB", "MAXRSS_KB"))}  # fmt: skip
    routed = json.loads((out / "report.json").read_text())["data"]["tokens"]
    peak = kb["MAXRSS_KB"] / 1024
    return peak, peak - kb["BASE_KB"] / 1024, time.perf_counter() - start, routed


def main() -> None:
    """Both runs and their ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--factor", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.jsonl"
        write_corpus(data, chars=6 * args.tokens * args.factor)  # > 4 chars per token
        small = measure(args.run_dir, data, args.tokens, Path(tmp) / "small")
        big = measure(args.run_dir, data, args.tokens * args.factor, Path(tmp) / "big")
    print("| tokens routed | peak RSS (MiB) | above libraries (MiB) | wall (s) |")
    print("|---|---|---|---|")
    for rss, above, wall, routed in (small, big):
        print(f"| {routed} | {rss:.0f} | {above:.0f} | {wall:.0f} |")
    print(f"\npeak RSS ratio {args.factor}x / 1x: {big[0] / small[0]:.3f}; "
          f"above libraries: {big[1] / small[1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
