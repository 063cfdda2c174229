"""Bad data files stop the run with one line naming the file (and line), exit 2, no traceback."""

from __future__ import annotations

import pytest

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
