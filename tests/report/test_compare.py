"""moespec-compare on a real Hydra sweep: table cells against summary.json, curves against metrics.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moespec.report.compare import find_runs, main, markdown_table, run_labels
from moespec.train.run_metrics import Run


@pytest.fixture(scope="module")
def sweep_dir(run_train, tmp_path_factory) -> Path:
    """Two smoke runs of one Hydra multirun sweep over the variance weight."""
    sweep = tmp_path_factory.mktemp("sweep")
    proc = run_train(
        [
            "-m",
            "experiment=smoke",
            "loss.variance.weight=1e-3,1e-2",
            "trainer.max_steps=4",
            "trainer.progress=false",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def _table_cells(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_sweep_table_matches_each_runs_summary(sweep_dir):
    runs = find_runs([sweep_dir])
    assert [r.path.name for r in runs] == ["0", "1"]
    assert run_labels(runs) == ["loss.variance.weight=0.001", "loss.variance.weight=0.01"]
    summaries = [json.loads((sweep_dir / n / "summary.json").read_text()) for n in ("0", "1")]
    assert summaries[0]["weights/variance"] == pytest.approx(1e-3)
    assert summaries[1]["weights/variance"] == pytest.approx(1e-2)
    cells = _table_cells(markdown_table(runs))
    assert cells["steps"] == ["4", "4"]
    checked = 0
    for key, label in [
        ("val/loss", "validation loss"),
        ("val/routing/output_overlap", "validation: output overlap"),
        ("val/routing/domain_mi", "validation: domain MI"),
        ("routing/output_overlap", "expert output overlap"),
        ("routing/domain_mi", "domain MI (normalised)"),
        ("routing/variance", "routing variance"),
        ("routing/maxvio", "MaxVio (load imbalance)"),
        ("weights/variance", "γ (variance weight)"),
    ]:
        values = [s[key] for s in summaries]
        shown = [float(c.strip("*")) for c in cells[label]]
        assert shown == pytest.approx(values, rel=1e-3), key
        bold = [c.startswith("**") for c in cells[label]]
        lower = ("val/loss", "val/routing/output_overlap", "routing/output_overlap")
        if key in lower and values[0] != values[1]:
            assert bold == [v == min(values) for v in values], key
        higher = ("val/routing/domain_mi", "routing/domain_mi", "routing/variance")
        if key in higher and values[0] != values[1]:
            assert bold == [v == max(values) for v in values], key
        if key in ("routing/maxvio", "weights/variance"):
            assert not any(bold), key
        checked += 1
    assert checked == 8


def test_cli_writes_curves_that_follow_metrics_jsonl(sweep_dir, capsys):
    assert main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| metric | loss.variance.weight=0.001 | loss.variance.weight=0.01 |")
    png = sweep_dir / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"curves: {png}" in out
    # The plotted series are exactly the logged rows (reference: a plain scan of the file).
    for run in find_runs([sweep_dir]):
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        for key in ("train/lm_loss", "val/loss", "routing/output_overlap"):
            ref = [(r["step"], r[key]) for r in rows if key in r and "alert" not in r]
            assert ref and list(zip(*run.series(key))) == ref


def test_unfinished_run_reports_last_logged_values(sweep_dir, tmp_path, capsys):
    run_dir = tmp_path / "cut"
    shutil.copytree(sweep_dir / "0", run_dir)
    (run_dir / "summary.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:1]) + "\n")
    first = json.loads(lines[0])
    (run,) = find_runs([run_dir])
    assert run.last_step == first["step"]
    expected = {k: v for k, v in first.items() if "/" in k and not k.startswith("layer")}
    assert run.summary == expected
    assert main([str(run_dir), "--json", "--no-plot"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["steps"] == first["step"] and shown["train/lm_loss"] == first["train/lm_loss"]


def test_bad_paths_fail_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'missing'}: no such directory"]

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a run directory" in err[0]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "tra\n')
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad / 'metrics.jsonl'}:2: not JSON")


def test_labels_fall_back_to_directory_names(tmp_path):
    def run(name: str, *overrides: str) -> Run:
        return Run(path=tmp_path / name, overrides=list(overrides))

    same = ("experiment=smoke", "loss=specialization")
    assert run_labels([run("seed0", *same), run("seed1", *same)]) == ["seed0", "seed1"]
    assert run_labels([run("a"), run("b")]) == ["a", "b"]
    assert run_labels([run("a", "x=1"), run("b", "x=1", "y=2")]) == ["a", "y=2"]
    assert run_labels([run("a", "x=1"), run("b", "x=1"), run("c", "x=2")]) == [
        "x=1 (a)",
        "x=1 (b)",
        "x=2 (c)",
    ]


def test_relogged_steps_keep_the_last_row(tmp_path):
    """A run resumed from an older checkpoint logs some steps again: the newer row wins."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [(10, 5.0), (20, 4.0), (30, 3.5), (20, 4.1), (30, 3.6), (40, 3.0)]
    text = "".join(json.dumps({"step": s, "train/lm_loss": v}) + "\n" for s, v in rows)
    (run_dir / "metrics.jsonl").write_text(text + json.dumps({"step": 40, "alert": "x"}) + "\n")
    (run,) = find_runs([run_dir])
    assert run.series("train/lm_loss") == ([10, 20, 30, 40], [5.0, 4.1, 3.6, 3.0])
    assert run.summary == {"train/lm_loss": 3.0} and run.alerts == ["x"]


def test_odd_run_directories(tmp_path, capsys):
    alerts_only = tmp_path / "alerts"
    alerts_only.mkdir()
    (alerts_only / "metrics.jsonl").write_text(json.dumps({"step": 3, "alert": "dead"}) + "\n")
    assert main([str(alerts_only)]) == 0
    captured = capsys.readouterr()
    assert "| routing alarms | 1 |" in captured.out and "no curves" in captured.err

    assert main([str(alerts_only / "metrics.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file; give the run directory" in err[0]

    (alerts_only / "summary.json").write_text('{"val/loss": 4.')
    assert main([str(alerts_only), "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "summary.json: not JSON" in err[0]


def test_launch_overrides_do_not_label_and_printed_ties_have_no_winner(tmp_path):
    def run(name: str, *overrides: str, **summary: float) -> Run:
        return Run(path=tmp_path / name, overrides=list(overrides), summary=summary)

    a = run("a", "x=1", "trainer.stop_after=5", "trainer.resume=auto", **{"val/loss": 6.86068})
    b = run("b", "x=2", **{"val/loss": 6.86059})
    assert run_labels([a, b]) == ["x=1", "x=2"]
    cells = _table_cells(markdown_table([a, b]))
    assert cells["validation loss"] == ["6.861", "6.861"]  # equal as printed: neither bold
    b.summary["val/loss"] = 6.5
    assert _table_cells(markdown_table([a, b]))["validation loss"] == ["6.861", "**6.5**"]
