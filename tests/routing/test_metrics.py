"""Routing metrics against hand-worked numbers and plain-Python loops over tokens."""

import math
import random
from collections import Counter

import pytest
import torch

from moespec.routing.losses import output_overlap
from moespec.routing.metrics import (
    dead_experts,
    domain_mutual_information,
    load_cv,
    load_entropy,
    load_fraction,
    max_violation,
    routing_entropy,
    token_set_jaccard,
)


def _routing(t, e, k, d, seed):
    """Random top-k routing of ``t`` tokens over ``e`` experts, with a domain in ``range(d)``."""
    rng = random.Random(seed)
    idx = [rng.sample(range(e), k) for _ in range(t)]
    dom = [rng.randrange(d) for _ in range(t)]
    return idx, dom


def _slot_counts(idx, e):
    counts = [0] * e
    for row in idx:
        for x in row:
            counts[x] += 1
    return torch.tensor(counts, dtype=torch.float64)


def _coactivation(idx, e):
    """[E,E]: tokens routed to both i and j (diagonal: tokens of i), counted token by token."""
    c = torch.zeros(e, e, dtype=torch.float64)
    for row in idx:
        for a in row:
            for b in row:
                c[a, b] += 1
    return c


def _joint(idx, dom, e, d):
    j = torch.zeros(e, d, dtype=torch.float64)
    for row, dm in zip(idx, dom):
        for x in row:
            j[x, dm] += 1
    return j


# ------------------------------------------------------------------------- load_fraction


def test_load_fraction_by_hand():
    # [2,0,2]: 4 slots routed -> [2/4, 0, 2/4]
    assert load_fraction(torch.tensor([2.0, 0.0, 2.0])).tolist() == [0.5, 0.0, 0.5]
    assert load_fraction(torch.tensor([5.0])).tolist() == [1.0]  # one expert takes everything
    assert load_fraction(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # nothing routed: no 0/0
    assert load_fraction(torch.zeros(0)).numel() == 0


def test_load_fraction_matches_loop():
    idx, _ = _routing(40, 6, 2, 1, seed=0)
    counts = _slot_counts(idx, 6)
    expect = [sum(row.count(x) for row in idx) / (40 * 2) for x in range(6)]
    assert load_fraction(counts).tolist() == pytest.approx(expect, rel=1e-12)


# ------------------------------------------------------------------- load_cv, max_violation


def test_load_cv_by_hand():
    # [2,0,2]: mean 4/3; deviations 2/3, -4/3, 2/3; population variance (4+16+4)/9/3 = 8/9;
    # std 2·sqrt(2)/3; cv = std/mean = sqrt(2)/2
    assert load_cv(torch.tensor([2.0, 0.0, 2.0])) == pytest.approx(math.sqrt(2) / 2, rel=1e-6)
    # [1,3]: mean 2, std 1 -> 0.5 (the unbiased std would give 0.707)
    assert load_cv(torch.tensor([1.0, 3.0])) == pytest.approx(0.5, rel=1e-6)
    assert load_cv(torch.tensor([4.0, 4.0, 4.0])) == 0.0
    assert load_cv(torch.tensor([7.0])) == 0.0  # one expert
    assert load_cv(torch.zeros(4)) == 0.0  # nothing routed
    assert load_cv(torch.zeros(0)) == 0.0  # no expert


def test_load_cv_matches_loop():
    idx, _ = _routing(50, 8, 2, 1, seed=1)
    counts = _slot_counts(idx, 8).tolist()
    mean = sum(counts) / len(counts)
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts))
    assert load_cv(torch.tensor(counts)) == pytest.approx(std / mean, rel=1e-6)


def test_max_violation_by_hand():
    # [2,0,2]: mean 4/3, largest |load - mean| = 4/3 (the dead expert) -> 1.0
    assert max_violation(torch.tensor([2.0, 0.0, 2.0])) == pytest.approx(1.0)
    # [6,2,2,2]: mean 3, largest deviation 3 (the hot expert) -> 1.0
    assert max_violation(torch.tensor([6.0, 2.0, 2.0, 2.0])) == pytest.approx(1.0)
    # [4,2]: mean 3, deviation 1 -> 1/3
    assert max_violation(torch.tensor([4.0, 2.0])) == pytest.approx(1 / 3)
    # [10,0,0,0]: mean 2.5, deviation 7.5 -> 3.0 (= E - 1 under total collapse)
    assert max_violation(torch.tensor([10.0, 0.0, 0.0, 0.0])) == pytest.approx(3.0)
    assert max_violation(torch.tensor([3.0, 3.0])) == 0.0
    assert max_violation(torch.tensor([9.0])) == 0.0
    assert max_violation(torch.zeros(3)) == 0.0
    assert max_violation(torch.zeros(0)) == 0.0


def test_max_violation_matches_loop():
    idx, _ = _routing(30, 5, 2, 1, seed=2)
    counts = _slot_counts(idx, 5).tolist()
    mean = sum(counts) / len(counts)
    expect = max(abs(c - mean) for c in counts) / mean
    assert max_violation(torch.tensor(counts)) == pytest.approx(expect, rel=1e-6)


# -------------------------------------------------------------------------- dead_experts


def test_dead_experts_by_hand():
    assert dead_experts(torch.tensor([2.0, 0.0, 2.0])) == 1
    assert dead_experts(torch.tensor([0.0, 0.0, 5.0, 0.0])) == 3
    assert dead_experts(torch.zeros(3)) == 3
    assert dead_experts(torch.tensor([1.0])) == 0
    assert dead_experts(torch.zeros(0)) == 0
    assert isinstance(dead_experts(torch.tensor([0.0, 1.0])), int)


# -------------------------------------------------------------------------- load_entropy


def test_load_entropy_by_hand():
    # [2,0,2]: p = [1/2, 0, 1/2], H = log 2, normalised by log 3 -> 0.6309
    assert load_entropy(torch.tensor([2.0, 0.0, 2.0])) == pytest.approx(
        math.log(2) / math.log(3), rel=1e-6
    )
    # [1,3]: p = [1/4, 3/4], H = -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623, / log 2 -> 0.8113
    assert load_entropy(torch.tensor([1.0, 3.0])) == pytest.approx(0.8112781244591328, rel=1e-6)
    assert load_entropy(torch.tensor([3.0, 3.0, 3.0, 3.0])) == pytest.approx(1.0, rel=1e-6)
    assert load_entropy(torch.tensor([0.0, 0.0, 8.0])) == 0.0  # collapse
    assert load_entropy(torch.tensor([5.0])) == 0.0  # one expert: log E = 0
    assert load_entropy(torch.zeros(3)) == 0.0
    assert load_entropy(torch.zeros(0)) == 0.0


def test_load_entropy_matches_loop():
    idx, _ = _routing(40, 6, 2, 1, seed=3)
    counts = _slot_counts(idx, 6).tolist()
    total = sum(counts)
    h = -sum(c / total * math.log(c / total) for c in counts if c > 0)
    assert load_entropy(torch.tensor(counts)) == pytest.approx(h / math.log(6), rel=1e-6)


# ----------------------------------------------------------------------- routing_entropy


def test_routing_entropy_by_hand():
    scores = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],  # log 2
            [1.0, 0.0, 0.0, 0.0],  # 0
            [0.25, 0.25, 0.25, 0.25],  # log 4
            [2.0, 2.0, 0.0, 0.0],  # not normalised: [1/2, 1/2, 0, 0] -> log 2
            [0.0, 0.0, 0.0, 0.0],  # nothing: 0, not NaN
        ]
    )
    expect = [math.log(2), 0.0, math.log(4), math.log(2), 0.0]
    assert routing_entropy(scores).tolist() == pytest.approx(expect, abs=1e-6)
    assert routing_entropy(torch.zeros(0, 4)).shape == (0,)


def test_routing_entropy_matches_loop():
    scores = torch.rand(9, 5, generator=torch.Generator().manual_seed(4))
    scores[0, 2] = 0.0
    expect = []
    for row in scores.tolist():
        s = sum(row)
        expect.append(-sum(v / s * math.log(v / s) for v in row if v > 0))
    assert routing_entropy(scores).tolist() == pytest.approx(expect, rel=1e-5)


# --------------------------------------------------------------------- token_set_jaccard


def test_token_set_jaccard_by_hand():
    # token sets: expert 0 = {0, 1}, expert 1 = {1, 2}, expert 2 = {3}
    # J01 = |{1}| / |{0,1,2}| = 1/3, J02 = J12 = 0 -> mean over the 3 pairs = 1/9
    idx = [[0], [0, 1], [1], [2]]
    c = _coactivation(idx, 3)
    assert c.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert token_set_jaccard(c) == pytest.approx(1 / 9, rel=1e-6)
    # identical sets: J = 1
    assert token_set_jaccard(_coactivation([[0, 1], [0, 1]], 2)) == pytest.approx(1.0)
    # two dead experts: empty union counts 0, not NaN; J(0,1) = 0 too -> 0
    assert token_set_jaccard(_coactivation([[0], [1]], 4)) == 0.0
    assert token_set_jaccard(torch.zeros(3, 3)) == 0.0
    assert token_set_jaccard(torch.tensor([[4.0]])) == 0.0  # one expert: no pair
    assert token_set_jaccard(torch.zeros(0, 0)) == 0.0


def test_token_set_jaccard_matches_python_sets():
    e = 5
    idx, _ = _routing(30, e, 2, 1, seed=5)
    sets = [{t for t, row in enumerate(idx) if x in row} for x in range(e)]
    pairs = [(a, b) for a in range(e) for b in range(e) if a < b]
    expect = sum(len(sets[a] & sets[b]) / len(sets[a] | sets[b]) for a, b in pairs) / len(pairs)
    assert token_set_jaccard(_coactivation(idx, e)) == pytest.approx(expect, rel=1e-6)


# -------------------------------------------------------------- domain_mutual_information


def test_domain_mutual_information_by_hand():
    # perfect specialisation: expert = domain, I = H(domain) -> 1
    assert domain_mutual_information(torch.tensor([[2.0, 0.0], [0.0, 2.0]])) == pytest.approx(1)
    # independent: p(e,d) = p(e) p(d) -> 0
    assert domain_mutual_information(torch.tensor([[1.0, 1.0], [2.0, 2.0]])) == pytest.approx(
        0.0, abs=1e-12
    )
    # [[2,1],[0,1]] / 4: p(e) = [3/4, 1/4], p(d) = [1/2, 1/2]
    # I = 1/2 log(4/3) + 1/4 log(2/3) + 1/4 log 2 = 0.215762, H(d) = log 2 -> 0.311278
    assert domain_mutual_information(torch.tensor([[2.0, 1.0], [0.0, 1.0]])) == pytest.approx(
        0.31127812445913283, rel=1e-9
    )
    assert domain_mutual_information(torch.tensor([[3.0], [1.0]])) == 0.0  # one domain: H = 0
    assert domain_mutual_information(torch.zeros(3, 2)) == 0.0  # nothing routed
    assert domain_mutual_information(torch.zeros(0, 0)) == 0.0


def ref_domain_mi(idx, dom):
    """I(expert; domain) / H(domain) over routed slots, textbook formula over a dict of counts."""
    joint = Counter((x, dm) for row, dm in zip(idx, dom) for x in row)
    n = sum(joint.values())
    pe, pd = Counter(), Counter()
    for (x, dm), c in joint.items():
        pe[x] += c / n
        pd[dm] += c / n
    mi = sum(c / n * math.log((c / n) / (pe[x] * pd[dm])) for (x, dm), c in joint.items())
    hd = -sum(p * math.log(p) for p in pd.values() if p > 0)
    return mi / hd if hd > 0 else 0.0


@pytest.mark.parametrize("seed", [6, 7])
def test_domain_mutual_information_matches_loop(seed):
    e, d = 6, 3
    idx, dom = _routing(60, e, 2, d, seed)
    # make it informative: domain 0 prefers expert 0
    idx = [[0, row[1] if row[1] != 0 else row[0]] if dm == 0 else row for row, dm in zip(idx, dom)]
    got = domain_mutual_information(_joint(idx, dom, e, d))
    assert got == pytest.approx(ref_domain_mi(idx, dom), rel=1e-9)
    assert 0.0 < got < 1.0


# ------------------------------------------------------------------------ output_overlap


def test_output_overlap_by_hand():
    y = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 1.0]],  # |cos| = 1/sqrt(2)
            [[1.0, 0.0], [0.0, -2.0]],  # 0
            [[1.0, 0.0], [-3.0, 0.0]],  # |cos(y, -3y)| = 1
        ]
    )
    # mean over tokens (each pair counted in both orders) = (0.7071 + 0 + 1) / 3 = 0.5690
    assert output_overlap(y).item() == pytest.approx((1 / math.sqrt(2) + 1) / 3, rel=1e-6)
    assert output_overlap(torch.randn(4, 1, 3)).item() == 0.0  # k = 1
    assert output_overlap(torch.zeros(0, 2, 3)).item() == 0.0  # no token
    assert output_overlap(torch.zeros(2, 2, 3)).item() == 0.0  # zero outputs: 0, not NaN


def test_output_overlap_matches_loop():
    y = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(8))
    y[0, 1] = 0.0
    total, n = 0.0, 0
    for tok in y.tolist():
        for a in range(3):
            for b in range(3):
                if a == b:
                    continue
                dot = sum(u * v for u, v in zip(tok[a], tok[b]))
                na = math.sqrt(sum(u * u for u in tok[a]))
                nb = math.sqrt(sum(v * v for v in tok[b]))
                total += abs(dot) / (na * nb) if na * nb > 0 else 0.0
                n += 1
    assert output_overlap(y).item() == pytest.approx(total / n, rel=1e-5)
