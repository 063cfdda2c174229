"""A small decoder-only MoE language model for demos, tests and benchmarks.

RMSNorm, rotary attention through ``scaled_dot_product_attention``, and an MoE FFN in every
layer (any backend from :func:`moespec.moe.build_moe_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..moe import MoEConfig, build_moe_layer
from ..routing import LossConfig, iter_routers
from .activation_checkpointing import recomputing, replaying


@dataclass
class TinyMoEConfig:
    """Dimensions of the tiny MoE LM (the MoE and loss settings come separately)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                "model.hidden_size / model.num_heads must be even for rotary embeddings"
            )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * self.weight


def rotary_tables(
    seq_len: int, head_dim: int, theta: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, head_dim/2]."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    ang = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of ``x`` [B,h,S,d]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, cfg: TinyMoEConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` [B,1,S,S] (True = may attend) replaces the plain causal mask when given."""
        b, s, _ = x.shape
        q, k, v = (
            self.qkv_proj(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MoE FFN."""

    def __init__(self, cfg: TinyMoEConfig, moe: MoEConfig, loss: LossConfig, index: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = build_moe_layer(cfg.hidden_size, moe, loss, layer_index=index)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_attn_norm(x))

    def checkpointed(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward under non-reentrant activation checkpointing: activations are
        recomputed in backward, where the routers keep what the first forward recorded."""

        def run(*args: torch.Tensor | None) -> torch.Tensor:
            if not recomputing():
                return self(*args)
            with replaying(iter_routers(self)):
                return self(*args)

        return checkpoint(run, x, cos, sin, mask, use_reentrant=False)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B,1,S,S] from ``document_ids`` [B,S]: a token attends to
    the earlier tokens of its own example; padding (-1) attends to itself only."""
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    real = (document_ids >= 0)[:, :, None]
    eye = torch.eye(s, dtype=torch.bool, device=document_ids.device)
    return ((same & real & causal) | eye)[:, None]


@dataclass
class LMOutput:
    """Logits [B,S,V] and, when labels were given, the loss to train on.

    ``loss`` is the mean token cross-entropy plus ``model_aux_loss``, a weighted routing term
    that the model adds itself (a Hugging Face model's own aux loss), when there is one.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    token_losses: torch.Tensor | None = field(default=None, repr=False)
    model_aux_loss: torch.Tensor | None = None

    @property
    def lm_loss(self) -> torch.Tensor | None:
        """The mean token cross-entropy alone."""
        if self.loss is None or self.model_aux_loss is None:
            return self.loss
        return self.loss - self.model_aux_loss


def lm_output(
    logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int = -100
) -> LMOutput:
    """Per-token and mean cross-entropy of ``logits`` [B,S,V] against aligned ``labels`` [B,S]."""
    if labels is None:
        return LMOutput(logits=logits)
    b, s = labels.shape
    token_losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(b, s)
    valid = (labels != ignore_index).float()
    loss = (token_losses * valid).sum() / valid.sum().clamp_min(1.0)
    return LMOutput(logits=logits, loss=loss, token_losses=token_losses)


class TinyMoELM(nn.Module):
    """Decoder-only MoE LM: embeddings, N MoE decoder layers, final norm, LM head."""

    def __init__(
        self, cfg: TinyMoEConfig, moe: MoEConfig | None = None, loss: LossConfig | None = None
    ) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        moe = moe or MoEConfig()
        loss = loss or LossConfig()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, moe, loss, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_weights(cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        head_dim = cfg.hidden_size // cfg.num_heads
        cos, sin = rotary_tables(cfg.max_seq_len, head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in backward (non-reentrant) while training."""
        self.activation_checkpointing = enabled

    def _init_weights(self, std: float) -> None:
        """Embeddings and attention get ``std``; MoE layers keep their own init."""
        for name, p in self.named_parameters():
            if ".mlp." in name or p.dim() < 2:
                continue
            nn.init.normal_(p, std=std)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
        position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> LMOutput:  # fmt: skip
        """``labels`` are already aligned with ``input_ids`` (label t = token after t).

        Packed rows: ``position_ids`` [B,S] restart at each example and ``document_ids`` [B,S]
        (-1 on padding) keep attention within each example (a block-diagonal causal mask).
        """
        b, s = input_ids.shape
        if s > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {s} exceeds model.max_seq_len={self.config.max_seq_len}"
            )
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            cos, sin = self.rope_cos[:s].to(x.device), self.rope_sin[:s].to(x.device)
        else:  # per-row tables [B,1,S,d/2], broadcast over heads
            pos = position_ids.to(x.device)
            cos, sin = (
                self.rope_cos.to(x.device)[pos][:, None],
                self.rope_sin.to(x.device)[pos][:, None],
            )
        mask = None if document_ids is None else document_mask(document_ids.to(x.device))
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = layer.checkpointed(x, cos, sin, mask) if ckpt else layer(x, cos, sin, mask)
        return lm_output(self.lm_head(self.norm(x)), labels, ignore_index)

    def num_parameters(self) -> int:
        """Number of distinct parameters."""
        return sum(p.numel() for p in self.parameters())
