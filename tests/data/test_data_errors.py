"""Bad data files stop the run with one line naming the file (and line), exit 2, no traceback."""

from __future__ import annotations

import pytest

from tests.common import ROOT

SMOKE = ["experiment=smoke", "data=jsonl", "wandb.enabled=false", "trainer.progress=false"]


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "content,expect",
    [
        (
            '{"text": "one", "domain": "a"}\n{"text": "broken\n{"text": "three"}\n',
            ":2: not a JSON object",
        ),
        ('{"text": "one"}\n[1, 2]\n', ":2: a JSON Lines row must be an object, got list"),
        ("", ": the file is empty (no rows)"),
        ("\n  \n", ": the file is empty (no rows)"),
    ],
)
def test_bad_jsonl_is_one_line(run_train, tmp_path, content, expect):
    data = tmp_path / "rows.jsonl"
    data.write_text(content)
    proc = run_train([*SMOKE, f"data.source={data}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {data}{expect}" or last.startswith(f"error: {data}{expect}"), last


@pytest.mark.multiproc
def test_a_validation_split_without_a_batch_stops_before_step_one(run_train, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [
        f'{{"text": "row {i}: ' + "the quick brown fox " * 8 + '", "domain": "a"}'
        for i in range(60)
    ]
    data.write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    args = [*SMOKE, f"data.source={data}", "data.val_fraction=0.02", f"hydra.run.dir={run_dir}"]
    proc = run_train(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "the validation split has" in last and "data.val_fraction (now 0.02)" in last, last
    assert not (run_dir / "metrics.jsonl").exists()  # no step was trained


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["malformed", "small_val"])
def test_check_reads_the_data_files(train_env, tmp_path, case):
    """``moespec-train --check`` finds what the run would stop on, before anything trains."""
    import subprocess
    import sys

    data = tmp_path / "rows.jsonl"
    if case == "malformed":
        data.write_text('{"text": "one"}\n{"text": "broken\n')
        expect, extra = ":2: not a JSON object", []
    else:
        line = '{"text": "' + "the quick brown fox " * 8 + '", "domain": "a"}'
        data.write_text("\n".join([line] * 60) + "\n")
        expect, extra = "the validation split has", ["data.val_fraction=0.02"]
    proc = subprocess.run(
        [sys.executable, "-m", "moespec.train", "--check", *SMOKE, f"data.source={data}", *extra],
        env=train_env, cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert expect in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
