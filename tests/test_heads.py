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

IMG = 100
TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
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
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
                projection_dim=32,
            ),
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
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
            ),
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
