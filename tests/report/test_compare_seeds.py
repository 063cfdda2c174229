"""Seed-grouped comparison: groups, mean ± std and the paired 95% interval against a reference
computed here from the per-run values (statistics module, t quantiles from the table)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from moespec.report.compare import find_runs, main, seed_groups, seed_table
from moespec.report.seed_statistics import group_by_seed, paired_difference, t_cdf, t_quantile

#: Two-sided 95% critical values of Student's t (any statistics table).
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163}

VAL = {  # (loss, seed) -> validation loss; specialization is lower on every seed
    ("aux_only", 0): 4.680, ("aux_only", 1): 4.702, ("aux_only", 2): 4.655, ("aux_only", 3): 4.690,
    ("specialization", 0): 4.622, ("specialization", 1): 4.660, ("specialization", 2): 4.611,
    ("specialization", 3): 4.640,
}  # fmt: skip
MI = {  # domain MI: no consistent sign
    ("aux_only", 0): 0.12, ("aux_only", 1): 0.20, ("aux_only", 2): 0.15, ("aux_only", 3): 0.18,
    ("specialization", 0): 0.22, ("specialization", 1): 0.14, ("specialization", 2): 0.16,
    ("specialization", 3): 0.17,
}  # fmt: skip


def _run(root: Path, loss: str, seed: int) -> Path:
    d = root / f"{loss}_s{seed}"
    (d / ".hydra").mkdir(parents=True)
    seed_override = [] if seed == 0 else [f"  - trainer.seed={seed}\n"]  # 0: the default
    (d / ".hydra" / "overrides.yaml").write_text(
        "".join(
            [
                "  - experiment=demo\n",
                f"  - loss={loss}\n",
                *seed_override,
                f"  - hydra.run.dir={d}\n",
            ]
        )  # fmt: skip
    )
    row = {"step": 300, "val/loss": VAL[(loss, seed)], "routing/domain_mi": MI[(loss, seed)]}
    (d / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    return d


@pytest.fixture
def runs_root(tmp_path) -> Path:
    for loss in ("aux_only", "specialization"):
        for seed in (2, 0, 3, 1):  # out of order: pairing is by seed, not by position
            _run(tmp_path, loss, seed)
    return tmp_path


def _reference(metric: dict, seeds: list[int]) -> tuple[float, float, float]:
    diffs = [metric[("specialization", s)] - metric[("aux_only", s)] for s in seeds]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = T975[len(diffs) - 1] * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def test_t_quantiles_match_the_table():
    for df, t in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-7)
        assert t_cdf(t, df) == pytest.approx(0.975, abs=1e-9)
    assert t_cdf(0.0, 3) == pytest.approx(0.5)


def test_groups_means_and_paired_interval(runs_root):
    runs = find_runs([runs_root])
    groups, labels = seed_groups(runs)
    assert labels == ["loss=aux_only", "loss=specialization"]
    assert [sorted(g.seeds) for g in groups] == [[0, 1, 2, 3]] * 2
    table = seed_table(runs)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in table.splitlines()[2:]}  # fmt: skip
    for label, metric in (("validation loss", VAL), ("domain MI (normalised)", MI)):
        for cell, loss in zip(rows[label][:2], ("aux_only", "specialization")):
            vals = [metric[(loss, s)] for s in range(4)]
            mean, sd = cell.split(" ± ")
            assert float(mean) == pytest.approx(statistics.mean(vals), abs=6e-4)
            assert float(sd) == pytest.approx(statistics.stdev(vals), rel=0.05)
        by_seed = [
            {s: metric[(loss, s)] for s in range(4)} for loss in ("aux_only", "specialization")
        ]
        d = paired_difference(*by_seed)
        mean, low, high = _reference(metric, [0, 1, 2, 3])
        assert (d.mean, d.low, d.high) == pytest.approx((mean, low, high), rel=1e-9)
        assert d.significant == (low > 0 or high < 0)
        assert rows[label][2].endswith("*") == d.significant
    assert paired_difference({s: VAL[("aux_only", s)] for s in range(4)},
                             {s: VAL[("specialization", s)] for s in range(4)}).significant  # fmt: skip
    assert not paired_difference({s: MI[("aux_only", s)] for s in range(4)},
                                 {s: MI[("specialization", s)] for s in range(4)}).significant  # fmt: skip


def test_pairs_only_common_seeds_and_one_seed_is_not_significant():
    d = paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {1: 2.5, 0: 1.2, 7: 0.0})
    mean, sd = statistics.mean([0.2, 0.5]), statistics.stdev([0.2, 0.5])
    assert d.seeds == [0, 1]
    assert (d.low, d.high) == pytest.approx((mean - T975[1] * sd / 2**0.5,
                                             mean + T975[1] * sd / 2**0.5))  # fmt: skip
    one = paired_difference({0: 1.0}, {0: 5.0})
    assert one.mean == 4.0 and not one.significant
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_same_seed_twice_is_an_error_and_cli_prints_the_groups(runs_root, capsys):
    with pytest.raises(ValueError, match="trainer.seed=1"):
        group_by_seed([["loss=a", "trainer.seed=1"], ["trainer.seed=1", "loss=a"]])
    rerun = find_runs([runs_root / "aux_only_s1", runs_root / "aux_only_s0"])
    rerun[1].overrides = list(rerun[0].overrides)  # the same recipe and seed twice
    assert seed_table(rerun) is None
    assert main([str(runs_root), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "runs grouped by trainer.seed" in out
    assert "loss=specialization − loss=aux_only [95% CI]" in out
    single = runs_root / "aux_only_s0"
    assert main([str(single), "--no-plot"]) == 0
    assert "grouped" not in capsys.readouterr().out
