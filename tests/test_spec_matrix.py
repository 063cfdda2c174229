"""scripts/spec_matrix.py reads runs back and checks each goal: a row that meets them says so,
one that misses says which, on run directories written like a training run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def matrix(load_script):
    with load_script("spec_matrix") as module:
        yield module


def _run(path: Path, val: float, overlap: float, rel_maxvio: float, collapsed: bool = False):
    path.mkdir(parents=True)
    rows = []
    for step in (10, 20, 30, 40):
        layer = {"relative_maxvio": 0.99, "relative_load_entropy": 0.05} if collapsed else {
            "relative_maxvio": rel_maxvio, "relative_load_entropy": 0.9
        }  # fmt: skip
        rows.append({
            "step": step, "val/loss": val, "val/routing/output_overlap": overlap,
            "routing/output_overlap": overlap, "routing/token_overlap": 0.1,
            "routing/domain_mi": 0.1, "routing/relative_maxvio": rel_maxvio,
            "routing/dead_experts": 0.0,
            **{f"layer0/routing/{k}": v for k, v in layer.items()},
        })  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _result(matrix, tmp_path: Path, spec_kw: list[dict]):
    row = matrix.Row("fake", "a fake setting", [])
    runs = {"aux_only": [], "specialization": []}
    for seed, kw in enumerate(spec_kw):
        _run(tmp_path / f"aux_only_s{seed}", val=5.0 + 0.01 * seed, overlap=0.3, rel_maxvio=0.1)
        _run(tmp_path / f"specialization_s{seed}", **kw)
        runs["aux_only"].append(matrix.load_run(tmp_path / f"aux_only_s{seed}"))
        runs["specialization"].append(matrix.load_run(tmp_path / f"specialization_s{seed}"))
    return matrix.Result(row, runs)


def test_a_row_that_meets_every_goal(matrix, tmp_path):
    good = [{"val": 4.99 + 0.01 * s, "overlap": 0.1, "rel_maxvio": 0.2} for s in range(3)]
    result = _result(matrix, tmp_path, good)
    assert matrix.row_figures(result)["misses"] == []
    assert "| fake | 3 | -0.0100 [" in matrix.table([result])
    assert "all met" in matrix.table([result])


def test_each_missed_goal_is_named(matrix, tmp_path):
    bad = [
        {"val": 5.1, "overlap": 0.25, "rel_maxvio": 0.6, "collapsed": True},
        {"val": 5.11, "overlap": 0.25, "rel_maxvio": 0.6, "collapsed": True},
    ]
    figures = matrix.row_figures(_result(matrix, tmp_path, bad))
    assert figures["misses"] == ["validation loss", "output overlap", "MaxVio", "alarms"]
    assert figures["alarms"] == 2  # one per run: the collapsed layer, replayed from its windows
