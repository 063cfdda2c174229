"""Heat maps of training and of the report: every cell carries its number, and a colour bar."""

from __future__ import annotations

import numpy as np

from moespec.train.plots import heatmap, plot_domain_heatmap, plt


def test_heatmap_writes_each_value_and_a_colour_bar():
    values = np.array([[0.125, 0.5, np.nan], [0.0, 0.75, 1.0]])
    fig, ax = plt.subplots()
    heatmap(ax, values, xlabel="expert", ylabel="layer", title="t", fmt="{:.3f}")
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    want = {(r, c): f"{v:.3f}" for (r, c), v in np.ndenumerate(values) if np.isfinite(v)}
    assert cells == want
    assert len(fig.axes) == 2  # the panel and its colour bar
    plt.close(fig)


def test_domain_heatmap_rows_are_p_domain_given_expert(tmp_path):
    joint = np.array([[[3.0, 1.0], [0.0, 2.0]]])  # one layer, 2 experts, 2 domains
    fig_path = plot_domain_heatmap(joint, ["a", "b"], tmp_path / "d.png", step=7)
    assert fig_path.is_file() and fig_path.stat().st_size > 1000
    fig, ax = plt.subplots()
    share = joint[0] / joint[0].sum(1, keepdims=True)
    heatmap(ax, share, xlabel="domain", ylabel="expert", title="", vmax=1.0)
    assert sorted(t.get_text() for t in ax.texts) == ["0.00", "0.25", "0.75", "1.00"]
    plt.close(fig)
