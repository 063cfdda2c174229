"""MoE layer config shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass

from ..routing import LossConfig, RouterConfig, validate_router_config
from .backend import backend_builder, backend_names

#: The built-in backends (``validate`` also accepts any registered later).
BACKENDS = backend_names()
#: Not a layer backend: DeepSpeed AutoEP converts a Hugging Face model's MoE blocks itself.
AUTOEP = "autoep"


@dataclass
class MoEConfig:
    """Which backend runs the experts, how many, and how tokens are routed to them."""

    backend: str = "native"
    num_experts: int = 8
    top_k: int = 2
    ffn_size: int = 256
    shared_expert_size: int = 0
    score_func: str = "softmax"
    normalize_topk: bool = True
    jitter: float = 0.0
    score_bias: bool = False
    bias_update_rate: float = 1e-3
    ep_size: int = 1
    capacity_factor: float = 0.0
    drop_tokens: bool = False

    def router_config(self, loss: LossConfig) -> RouterConfig:
        """The router config this MoE config implies, with the given loss weights."""
        return RouterConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            score_func=self.score_func,
            normalize_topk=self.normalize_topk,
            jitter=self.jitter,
            score_bias=self.score_bias,
            bias_update_rate=self.bias_update_rate,
            loss=loss,
        )

    def validate(self, *, own_experts: bool = True) -> None:
        """Raise ``ValueError`` naming the first invalid field. ``own_experts=False``: the
        model brings its own experts (Hugging Face), whose count the conversion checks."""
        if self.backend != AUTOEP:
            try:
                backend_builder(self.backend)
            except ValueError as err:
                raise ValueError(f"{err}, {AUTOEP} (Hugging Face models)") from None
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k} with moe.num_experts={self.num_experts}; valid: 1 <= top_k <= num_experts"
            )
        if self.ffn_size < 1:
            raise ValueError(f"moe.ffn_size must be >= 1, got {self.ffn_size}")
        if self.shared_expert_size < 0:
            raise ValueError(f"moe.shared_expert_size must be >= 0, got {self.shared_expert_size}")
        if self.ep_size < 1:
            raise ValueError(f"moe.ep_size must be >= 1, got {self.ep_size}")
        try:  # the router's own checks, under the moe.* names the recipe uses
            validate_router_config(self.router_config(LossConfig()))
        except ValueError as err:
            raise ValueError(str(err).replace("router.", "moe.")) from None
        if own_experts and self.num_experts % self.ep_size:
            raise ValueError(
                f"moe.num_experts={self.num_experts} is not divisible by moe.ep_size={self.ep_size}"
            )
        if self.ep_size > 1 and self.backend == "native":
            raise ValueError(
                "moe.ep_size > 1 needs moe.backend=deepspeed or autoep (expert parallel)"
            )
        if self.capacity_factor < 0:
            raise ValueError(f"moe.capacity_factor must be >= 0, got {self.capacity_factor}")
