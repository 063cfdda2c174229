"""Where moespec-eval writes, for a run, one of its checkpoints and an exported model."""

from __future__ import annotations

from moespec.train.runs import results_dir


def test_results_go_to_the_run_or_beside_the_model(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step00000040"
    model = run / "hf_model"
    for d in (step, model):
        d.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert results_dir(run) == run / "eval"
    assert results_dir(step) == run / "eval"  # not inside the checkpoint
    assert results_dir(model) == run / "hf_model_eval"  # never inside the model
