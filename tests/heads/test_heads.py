"""Head scoring, selection and the head controller on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from moespec.heads import (
    HeadController,
    HeadProfile,
    HeadSelectionConfig,
    score_heads,
    select_heads,
)
from moespec.hooks import count_hooks, find_attention_output_projections
from tests.common import DENSE_TEXT, TINY_VISION

IMG = 100
TEXT = DENSE_TEXT
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
VL_IDS = dict(
    image_token_id=IMG, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103
)


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    model.set_attn_implementation("eager")
    return model.eval()


def _warm(model: torch.nn.Module, inputs: list[dict]) -> tuple[torch.nn.Module, list[dict], dict]:
    """One forward first: transformers installs its output-capturing hooks lazily."""
    logits(model, inputs[0])
    return model, inputs, {}


def build(kind: str, seed: int = 0) -> tuple[torch.nn.Module, list[dict], dict]:
    """A tiny random model, two inputs and the score_heads keyword arguments for it."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        if kind == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
            config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        else:
            vision = dict(
                depth=1,
                hidden_size=32,
                out_hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                fullatt_block_indexes=[0],
                window_size=8,
            )
            config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config = config_cls(
            text_config=dict(TEXT, rope_parameters=MROPE), vision_config=vision, **VL_IDS
        )
        model = model_cls(config)
        inputs = []
        for tail in ([5, 6, 7, 8], [9, 10, 11, 12, 13]):
            ids = torch.tensor([[1, 3, 102] + [IMG] * 4 + [103, *tail]])
            inputs.append(
                dict(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=torch.randn(16, 96, generator=gen),
                    image_grid_thw=torch.tensor([[1, 4, 4]]),
                    mm_token_type_ids=(ids == IMG).long(),
                )
            )
        return _warm(_eager(model), inputs)
    if kind == "llava":
        config = LlavaConfig(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(TINY_VISION, model_type="clip_vision_model", projection_dim=32),
            image_token_id=IMG,
        )
        model = LlavaForConditionalGeneration(config)
        inputs = []
        for tail in ([5, 6, 7], [8, 9, 10, 11]):
            ids = torch.tensor([[1, 3] + [IMG] * 16 + tail])
            inputs.append(
                dict(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=torch.randn(1, 3, 16, 16, generator=gen),
                )
            )
        return _warm(_eager(model), inputs)
    if kind == "llava_onevision":
        config = LlavaOnevisionConfig(
            text_config=dict(TEXT, model_type="qwen2"),
            vision_config=dict(TINY_VISION, model_type="siglip_vision_model"),
            image_token_id=IMG,
            video_token_id=101,
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TEXT))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TEXT))
    else:
        raise ValueError(kind)
    inputs = [
        dict(input_ids=torch.randint(3, 100, (1, n), generator=gen), span=(2, 7)) for n in (12, 15)
    ]
    for item in inputs:
        item["attention_mask"] = torch.ones_like(item["input_ids"])
    return _warm(_eager(model), inputs)


def model_inputs(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "span"}


def logits(model: torch.nn.Module, item: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(item)).logits


def greedy(model: torch.nn.Module, item: dict, n: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **model_inputs(item), max_new_tokens=n, do_sample=False, min_new_tokens=n
        )


def make_profile(model: torch.nn.Module, heads: dict, gains: dict | None = None) -> HeadProfile:
    outs = find_attention_output_projections(model)
    layers, nh = len(outs), outs[0].num_heads
    return HeadProfile(
        model_type=model.config.model_type,
        num_layers=layers,
        num_heads=nh,
        scores=torch.zeros(layers, nh),
        heads=heads,
        gains=gains or {"perception": 1.16, "reasoning": 1.30},
        thresholds={},
    )


SOME_HEADS = {"perception": [(0, 1), (1, 3)], "reasoning": [(2, 0), (2, 2)]}
ALL_HEADS = {"perception": [(layer, h) for layer in range(3) for h in range(4)], "reasoning": []}
KINDS = ["qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision", "llama", "qwen2"]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_unit_gains_bit_identical(kind: str) -> None:
    model, inputs, _ = build(kind)
    base = logits(model, inputs[0])
    profile = make_profile(model, ALL_HEADS, {"perception": 1.0, "reasoning": 1.0})
    for mode in ("hook", "fold"):
        with HeadController(model, profile, mode=mode):
            assert torch.equal(logits(model, inputs[0]), base), mode


@pytest.mark.parametrize("kind", KINDS)
def test_hook_equals_fold_and_restores(kind: str) -> None:
    model, inputs, _ = build(kind)
    before, hooks = snapshot(model), count_hooks(model)
    base_logits, base_gen = logits(model, inputs[0]), greedy(model, inputs[0])
    profile = make_profile(model, SOME_HEADS)
    results = {}
    for mode in ("hook", "fold"):
        with HeadController(model, profile, mode=mode):
            results[mode] = (logits(model, inputs[0]), greedy(model, inputs[0]))
            if mode == "hook":
                assert count_hooks(model) == hooks + 3
        assert count_hooks(model) == hooks
        assert_same_weights(model, before)
    torch.testing.assert_close(results["hook"][0], results["fold"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(results["hook"][1], results["fold"][1])
    assert not torch.allclose(results["hook"][0], base_logits)
    assert torch.equal(logits(model, inputs[0]), base_logits)
    assert torch.equal(greedy(model, inputs[0]), base_gen)


@pytest.mark.parametrize("mode", ["hook", "fold"])
def test_restores_when_body_raises(mode: str) -> None:
    model, inputs, _ = build("qwen2_vl")
    before, hooks = snapshot(model), count_hooks(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        HeadController(model, make_profile(model, SOME_HEADS), mode),
    ):
        logits(model, inputs[0])
        raise RuntimeError("boom")
    assert count_hooks(model) == hooks
    assert_same_weights(model, before)


@pytest.mark.parametrize("kind", ["qwen2_vl", "llama"])
def test_bfloat16_generate_with_cache(kind: str) -> None:
    model, inputs, _ = build(kind)
    model.to(torch.bfloat16)
    before, hooks = snapshot(model), count_hooks(model)
    profile = make_profile(model, SOME_HEADS)
    item = dict(inputs[0])
    if "pixel_values" in item:
        item["pixel_values"] = item["pixel_values"].to(torch.bfloat16)
    outs = {}
    for mode in ("hook", "fold"):
        with HeadController(model, profile, mode=mode):
            outs[mode] = logits(model, item).float()
            gen = greedy(model, item)
            assert gen.shape[-1] == item["input_ids"].shape[-1] + 6
        assert count_hooks(model) == hooks
        assert_same_weights(model, before)
    torch.testing.assert_close(outs["hook"], outs["fold"], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "llava", "llama", "qwen2"])
def test_scores_match_output_attentions(kind: str) -> None:
    model, inputs, kwargs = build(kind)
    hooks = count_hooks(model)
    scores = score_heads(model, inputs, **kwargs)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    assert count_hooks(model) == hooks
    expected = torch.zeros(3, 4)
    for item in inputs:
        ids = item["input_ids"][0]
        if "span" in item:
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[item["span"][0] : item["span"][1]] = True
        else:
            mask = ids == IMG
        with torch.no_grad():
            out = model(**model_inputs(item), output_attentions=True)
        assert len(out.attentions) == 3
        for layer, attn in enumerate(out.attentions):
            expected[layer] += attn[0, :, -1, mask].sum(-1) / len(inputs)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_score_heads_switches_to_eager_and_back() -> None:
    model, inputs, _ = build("llama")
    expected = score_heads(model, inputs)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(score_heads(model, inputs), expected)
    assert model.config._attn_implementation == "sdpa"


def test_score_heads_batched_right_padding() -> None:
    model, inputs, _ = build("llama")
    single = score_heads(model, inputs)
    a, b = inputs[0]["input_ids"], inputs[1]["input_ids"]
    ids = torch.zeros(2, b.shape[1], dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, : a.shape[1]], mask[0, : a.shape[1]] = a[0], 1
    ids[1], mask[1] = b[0], 1
    batched = score_heads(model, [dict(input_ids=ids, attention_mask=mask)], span=(2, 7))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_forced_image_head_scores_one_and_is_perception() -> None:
    model, inputs, _ = build("qwen2_vl")
    layer, head, dim, big = 1, 2, 8, 10.0
    text = model.model.language_model
    with torch.no_grad():
        text.embed_tokens.weight[:, 0] = 0.0
        text.embed_tokens.weight[:, 1] = 1.0
        merger = model.model.visual.merger.mlp[-1]
        merger.weight.zero_()
        merger.bias.zero_()
        merger.bias[0] = 1.0
        for lyr in text.layers[:layer]:
            lyr.self_attn.o_proj.weight.zero_()
            lyr.mlp.down_proj.weight.zero_()
        attn = text.layers[layer].self_attn
        q_row = head * dim + 3
        k_row = (head // 2) * dim + 3
        attn.q_proj.weight[q_row - 3 : q_row + 5] = 0.0
        attn.q_proj.bias[q_row - 3 : q_row + 5] = 0.0
        attn.q_proj.weight[q_row, 1] = big
        attn.k_proj.weight[k_row - 3 : k_row + 5] = 0.0
        attn.k_proj.bias[k_row - 3 : k_row + 5] = 0.0
        attn.k_proj.weight[k_row, 0] = big
    scores = score_heads(model, inputs)
    assert scores[layer, head] > 0.999
    profile = select_heads(scores, HeadSelectionConfig(), model_type="qwen2_vl")
    assert (layer, head) in profile.heads["perception"]
    assert (layer, head) not in profile.heads["reasoning"]


def test_select_heads_thresholds_and_cap() -> None:
    scores = torch.full((10, 4), 0.1)
    scores[0, 0], scores[2, 1], scores[7, 3], scores[8, 0] = 0.9, 0.3, 0.25, 0.95
    scores[3, 0], scores[9, 2], scores[1, 1], scores[5, 3] = 0.0, 0.005, 0.0, 0.01
    profile = select_heads(scores)
    assert profile.heads["perception"] == [(0, 0), (2, 1), (7, 3)]
    assert profile.heads["reasoning"] == [(3, 0), (5, 3), (9, 2)]
    assert profile.gains == {"perception": 1.16, "reasoning": 1.30}
    capped = select_heads(scores, HeadSelectionConfig(max_fraction=0.1))
    assert len(capped.selected()) == 4
    assert capped.heads["perception"] == [(0, 0), (2, 1)]
    assert capped.heads["reasoning"] == [(3, 0), (9, 2)]
    gains = capped.gain_matrix()
    assert gains[0, 0] == pytest.approx(1.16) and gains[3, 0] == pytest.approx(1.30)
    assert int((gains != 1.0).sum()) == 4
    custom = select_heads(
        scores, HeadSelectionConfig(l_perc=1, tau_perc=0.5, l_reas=4, tau_reas=0.001)
    )
    assert custom.heads == {"perception": [(0, 0)], "reasoning": []}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(g_perc=0.9), "g_perc"),
        (dict(tau_reas=0.5), "tau_reas"),
        (dict(max_fraction=1.5), "max_fraction"),
    ],
)
def test_selection_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HeadSelectionConfig(**kwargs)


def test_profile_json_round_trip(tmp_path) -> None:
    scores = torch.rand(5, 3)
    profile = select_heads(
        scores,
        HeadSelectionConfig(tau_perc=0.5, tau_reas=0.2),
        model_type="llama",
        metadata={"samples": 4},
    )
    path = profile.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    for key in (
        "schema_version",
        "model_type",
        "num_layers",
        "num_heads",
        "scores",
        "heads",
        "gains",
        "thresholds",
    ):
        assert key in data
    loaded = HeadProfile.load(path)
    assert loaded.heads == profile.heads and loaded.gains == profile.gains
    assert loaded.thresholds == profile.thresholds and loaded.metadata == {"samples": 4}
    torch.testing.assert_close(loaded.scores, scores, atol=1e-7, rtol=0)
    data.pop("heads")
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing keys \\['heads'\\]"):
        HeadProfile.load(tmp_path / "bad.json")


def test_profile_for_other_model_is_rejected() -> None:
    model, _, _ = build("llama")
    wrong = HeadProfile(
        model_type="qwen2_vl",
        num_layers=3,
        num_heads=8,
        scores=torch.zeros(3, 8),
        heads={"perception": [(0, 5)], "reasoning": []},
        gains={"perception": 1.16, "reasoning": 1.3},
        thresholds={},
    )
    with pytest.raises(
        ValueError, match=r"3 layers x 8 heads.*LlamaForCausalLM has 3 layers x 4 heads"
    ):
        HeadController(model, wrong)
    with pytest.raises(ValueError, match="unknown mode 'fuse'"):
        HeadController(model, make_profile(model, SOME_HEADS), mode="fuse")


def test_inputs_without_image_tokens_are_rejected() -> None:
    model, inputs, _ = build("qwen2_vl")
    text_model, _, _ = build("llama")
    hooks = count_hooks(model), count_hooks(text_model)
    text_only = dict(input_ids=torch.tensor([[1, 5, 6, 7]]))
    with pytest.raises(ValueError, match="input 0: .*no image tokens \\(image_token_id=100\\)"):
        score_heads(model, [text_only])
    with pytest.raises(ValueError, match="no image_token_id; pass image_token_id= or span="):
        score_heads(text_model, [text_only])
    with pytest.raises(ValueError, match="span \\(3, 9\\) is empty or outside"):
        score_heads(text_model, [text_only], span=(3, 9))
    with pytest.raises(ValueError, match="no inputs"):
        score_heads(text_model, [], span=(0, 1))
    assert (count_hooks(model), count_hooks(text_model)) == hooks


def test_mla_heads_are_discovered() -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=6,
    )
    torch.manual_seed(0)
    model = _eager(DeepseekV3ForCausalLM(config))
    outs = find_attention_output_projections(model)
    assert [(o.num_heads, o.head_dim) for o in outs] == [(4, 6), (4, 6)]
    item = dict(input_ids=torch.randint(3, 100, (1, 10)))
    scores = score_heads(model, [item], span=(0, 5))
    assert scores.shape == (2, 4)
    profile = make_profile(model, {"perception": [(0, 1)], "reasoning": [(1, 3)]})
    with HeadController(model, profile, "hook"):
        hooked = logits(model, item)
    with HeadController(model, profile, "fold"):
        folded = logits(model, item)
    torch.testing.assert_close(hooked, folded, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- references


def reference_logits(model: torch.nn.Module, item: dict, heads: dict, gains: dict) -> torch.Tensor:
    """Slow reference: a per-head loop in plain pre-hooks on each layer's own o_proj."""
    outs = find_attention_output_projections(model)
    handles = []
    for out in outs:

        def pre_hook(_mod, args, layer=out.layer, nh=out.num_heads, hd=out.head_dim):
            x = args[0].clone()
            view = x.view(*x.shape[:-1], nh, hd)
            for cls, gain in gains.items():
                for lyr, head in heads[cls]:
                    if lyr == layer:
                        view[..., head, :] *= gain
            return (x,)

        handles.append(out.module.register_forward_pre_hook(pre_hook))
    try:
        return logits(model, item)
    finally:
        for handle in handles:
            handle.remove()


def reference_scores(model: torch.nn.Module, rows: list[dict], span=None) -> torch.Tensor:
    """Slow reference: each unpadded row alone, output_attentions, last token's mass."""
    total = 0
    for row in rows:
        with torch.no_grad():
            out = model(**row, output_attentions=True)
        ids = row["input_ids"][0]
        if span is None:
            mask = ids == IMG
        else:
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[span[0] : span[1]] = True
        total = total + torch.stack([a[0, :, -1, mask].sum(-1) for a in out.attentions])
    return total / len(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_layers_are_the_language_model(kind: str) -> None:
    from moespec.hooks import find_decoder_layers

    model, _, _ = build(kind)
    text = model.model.language_model if hasattr(model.model, "language_model") else model.model
    found = find_decoder_layers(model)
    assert len(found) == 3 and all(a is b for a, b in zip(found, text.layers))


# --------------------------------------------------------------------------- padding


PAD_ROWS = [
    torch.tensor([1, 3] + [IMG] * 4 + [5, 6, 7]),
    torch.tensor([1, 3] + [IMG] * 4 + [8, 9, 10, 11, 12, 13]),
]


def padded(rows: list[torch.Tensor], side: str, pad: int) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols], mask[i, cols] = row, 1
    return dict(input_ids=ids, attention_mask=mask)


def alone(rows: list[torch.Tensor]) -> list[dict]:
    return [
        dict(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long))
        for r in rows
    ]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pad", [0, IMG])
def test_padded_batch_scores_equal_rows_alone(side: str, pad: int) -> None:
    model, _, _ = build("llama")
    batch = padded(PAD_ROWS, side, pad)
    expected = reference_scores(model, alone(PAD_ROWS))
    got = score_heads(model, [batch], image_token_id=IMG)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # a span in token positions counts from each row's first attended token
    expected = reference_scores(model, alone(PAD_ROWS), span=(2, 6))
    got = score_heads(model, [batch], span=(2, 6))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # negative positions count from each row's end: (-7, -3) is (2, 6) in the row of 9 tokens
    # and (5, 9) in the row of 12
    rows = alone(PAD_ROWS)
    expected = (
        reference_scores(model, rows[:1], span=(2, 6))
        + reference_scores(model, rows[1:], span=(5, 9))
    ) / 2
    got = score_heads(model, [dict(batch, span=(-7, -3))])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_padding_rows_without_image_or_span_are_rejected_like_alone() -> None:
    model, _, _ = build("llama")
    rows = [PAD_ROWS[0], torch.tensor([1, 3, 8, 9, 10])]
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] have no image tokens"):
        score_heads(model, alone(rows[1:]), image_token_id=IMG)
    # the pad id is the image id: padding must not count as the second row's image
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no image tokens"):
        score_heads(model, [padded(rows, "right", IMG)], image_token_id=IMG)
    with pytest.raises(ValueError, match=r"span \(2, 7\) is empty or outside .* 5 tokens of row 1"):
        score_heads(model, [padded(rows, "left", 0)], span=(2, 7))
    holes = dict(input_ids=PAD_ROWS[0][None], attention_mask=torch.ones(1, 9, dtype=torch.long))
    holes["attention_mask"][0, 3] = 0
    with pytest.raises(ValueError, match="covers positions that attention_mask marks as padding"):
        score_heads(model, [holes], span=(2, 6))


# --------------------------------------------------------------------------- controller safety


def test_shared_o_proj_is_refused() -> None:
    model, inputs, _ = build("llama")
    item = inputs[0]
    layers = model.model.layers
    heads = {"perception": [(0, 1)], "reasoning": []}
    gains = {"perception": 1.16, "reasoning": 1.30}
    # one Parameter in two modules: hook scales only layer 0, fold would scale layer 1 too
    layers[1].self_attn.o_proj.weight = layers[0].self_attn.o_proj.weight
    before, hooks = snapshot(model), count_hooks(model)
    profile = make_profile(model, heads)
    with HeadController(model, profile, "hook"):
        hooked = logits(model, item)
    torch.testing.assert_close(hooked, reference_logits(model, item, heads, gains))
    with pytest.raises(
        ValueError,
        match=r"layer 0: the weight of .*layers.0.self_attn.o_proj shares its storage "
        r"with \['model.layers.1.self_attn.o_proj.weight'\]; mode='fold' would scale",
    ):
        HeadController(model, profile, "fold")
    # one module object used by two layers: the gain would apply to both layers, or twice
    layers[1].self_attn.o_proj = layers[0].self_attn.o_proj
    for mode in ("hook", "fold"):
        for sel in (
            {"perception": [(0, 1)], "reasoning": []},
            {"perception": [(0, 1), (1, 1)], "reasoning": []},
        ):
            with pytest.raises(ValueError, match=r"layers \[0, 1\] share one o_proj module"):
                HeadController(model, make_profile(model, sel), mode)
    # an unselected shared module is harmless
    with HeadController(
        model, make_profile(model, {"perception": [(2, 1)], "reasoning": []}), "fold"
    ):
        pass
    assert count_hooks(model) == hooks
    assert_same_weights(model, before)


def test_two_controllers_on_one_o_proj_are_refused() -> None:
    model, inputs, _ = build("llama")
    item = inputs[0]
    before, hooks = snapshot(model), count_hooks(model)
    gains = {"perception": 1.16, "reasoning": 1.30}
    a_heads = {"perception": [(0, 1)], "reasoning": []}
    b_heads = {"perception": [(0, 1)], "reasoning": [(2, 0)]}
    ref_a = reference_logits(model, item, a_heads, gains)
    ref_b = reference_logits(model, item, b_heads, gains)
    a = HeadController(model, make_profile(model, a_heads), "fold")
    for mode in ("fold", "hook"):
        b = HeadController(model, make_profile(model, b_heads), mode)
        with a:
            with pytest.raises(
                ValueError,
                match=r"layer 0: .*layers.0.self_attn.o_proj is already "
                r"controlled by an active HeadController\(mode='fold'",
            ):
                b.__enter__()
            # the refused controller changed nothing: A alone is in effect
            torch.testing.assert_close(logits(model, item), ref_a, atol=1e-6, rtol=1e-5)
        assert_same_weights(model, before)
        assert count_hooks(model) == hooks
        # once A has exited, B may run
        with b:
            torch.testing.assert_close(logits(model, item), ref_b, atol=1e-6, rtol=1e-5)
    # controllers on different layers compose, in any exit order
    c = HeadController(
        model, make_profile(model, {"perception": [(0, 1)], "reasoning": []}), "fold"
    )
    d = HeadController(
        model, make_profile(model, {"perception": [], "reasoning": [(2, 0)]}), "hook"
    )
    c.__enter__()
    d.__enter__()
    torch.testing.assert_close(logits(model, item), ref_b, atol=1e-6, rtol=1e-5)
    c.__exit__(None, None, None)
    d.__exit__(None, None, None)
    assert_same_weights(model, before)
    assert count_hooks(model) == hooks


def test_offloaded_model_hook_works_and_fold_is_refused() -> None:
    import copy

    from accelerate import cpu_offload

    model, inputs, _ = build("llama")
    item = inputs[0]
    heads = {"perception": [(0, 1)], "reasoning": [(2, 0)]}
    gains = {"perception": 1.16, "reasoning": 1.30}
    expected = reference_logits(model, item, heads, gains)
    offloaded = copy.deepcopy(model)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].self_attn.o_proj.weight.is_meta
    hooks = count_hooks(offloaded)
    profile = make_profile(offloaded, heads)
    with HeadController(offloaded, profile, "hook"):
        torch.testing.assert_close(logits(offloaded, item), expected)
    with pytest.raises(ValueError, match=r"layer 0: the weight of .* is offloaded \(device meta"):
        HeadController(offloaded, profile, "fold")
    assert count_hooks(offloaded) == hooks
    torch.testing.assert_close(logits(offloaded, item), logits(model, item))


def test_profile_of_other_model_type_warns(caplog) -> None:
    model, _, _ = build("llama")
    caplog.set_level("WARNING", logger="moespec")
    for model_type, warns in (("llama", False), ("unknown", False), ("qwen2", True)):
        caplog.clear()
        profile = make_profile(model, SOME_HEADS)
        profile.model_type = model_type
        HeadController(model, profile)
        records = [r for r in caplog.records if r.name == "moespec"]
        assert len(records) == int(warns), model_type
        if warns:
            assert "made for model_type 'qwen2' but the model is 'llama'" in records[0].getMessage()


# --------------------------------------------------------------------------- selection checks


@pytest.mark.parametrize(
    "layers, heads, percent",
    [
        (10, 10, 29),
        (10, 10, 57),
        (28, 12, 25),
        (28, 16, 35),
        (10, 10, 7),
        (36, 20, 35),
        (60, 20, 41),
    ],
)
def test_fraction_cap_is_exact(layers: int, heads: int, percent: int) -> None:
    scores = torch.full((layers, heads), 0.5)
    profile = select_heads(scores, HeadSelectionConfig(l_perc=100, max_fraction=percent / 100))
    # reference in integers: floor(percent * n / 100)
    assert len(profile.selected()) == percent * layers * heads // 100


@pytest.mark.parametrize("bad", [0.0, 0.5, float("nan"), float("inf"), "1.2", True, None])
def test_profile_gains_must_be_finite_and_amplify(bad) -> None:
    model, _, _ = build("llama")
    profile = make_profile(model, {"perception": [(0, 1)], "reasoning": []})
    data = profile.to_dict()
    data["gains"]["perception"] = bad
    with pytest.raises(ValueError, match=r"gains\['perception'\]=.* must be a finite number >= 1"):
        HeadProfile.from_dict(data)
    if isinstance(bad, float):
        with pytest.raises(ValueError, match=r"gains\['reasoning'\]=.* must be a finite number"):
            profile.with_gains(reasoning=bad)
    assert profile.gains == {"perception": 1.16, "reasoning": 1.30}


def test_profile_schema_errors_name_the_key() -> None:
    model, _, _ = build("llama")
    data = make_profile(model, SOME_HEADS).to_dict()
    missing = json.loads(json.dumps(data))
    del missing["gains"]["reasoning"]
    with pytest.raises(ValueError, match=r"gains are missing the key\(s\) \['reasoning'\]"):
        HeadProfile.from_dict(missing)
    both = json.loads(json.dumps(data))
    both["heads"]["reasoning"].append([0, 1])
    with pytest.raises(ValueError, match=r"heads \[\(0, 1\)\] are listed as both perception and"):
        HeadProfile.from_dict(both)
    with pytest.raises(ValueError, match="listed as both"):
        make_profile(model, {"perception": [(1, 3)], "reasoning": [(1, 3)]})
    bad = json.loads(json.dumps(data))
    bad["heads"]["perception"] = [[0, "x"]]
    with pytest.raises(
        ValueError, match=r"heads\['perception'\] must be a list of \[layer, head\]"
    ):
        HeadProfile.from_dict(bad)


@pytest.mark.parametrize("key", ["l_perc", "l_reas", "tau_perc", "g_reas"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_selection_config_rejects_non_finite(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"selection.{key} must be a finite number"):
        HeadSelectionConfig(**{key: value})
