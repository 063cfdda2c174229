"""docs/quickstart.md, run end to end: its bash blocks, as written, in a fresh directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import ROOT

DOC = ROOT / "docs" / "quickstart.md"


def bash_blocks(text: str) -> list[str]:
    """The fenced ```bash blocks of a Markdown text, in order."""
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_doc_is_about_ten_commands():
    lines = [ln for b in bash_blocks(DOC.read_text()) for ln in b.splitlines()]
    starts = ("python", "head", "tail", "moespec-", "wandb")
    commands = [ln for ln in lines if ln.startswith(starts)]
    assert 8 <= len(commands) <= 12, commands
    assert any(c.startswith("moespec-train ") for c in commands)


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, train_env):
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(DOC.read_text()))
    env = {**train_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{train_env['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    run = tmp_path / "first" / "runs" / "first"
    assert (run / "eval" / "results_step000040.json").is_file()
    assert "results of step 40:" in proc.stdout
    assert (run / "report" / "report.html").is_file()
    assert (run / "hf_model" / "tokenizer.json").is_file()
    assert "ok: the recipe composes" in proc.stdout
