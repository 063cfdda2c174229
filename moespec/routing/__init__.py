"""Router, routing losses, loss calibration and routing statistics. Depends only on torch."""

from . import losses, metrics
from .config import (
    AuxLossConfig,
    LossConfig,
    LossTermConfig,
    OrthogonalityLossConfig,
    RouterConfig,
    VarianceLossConfig,
    ZLossConfig,
    validate_router_config,
)
from .losses import LOSSES, LossInputs, routing_loss, validate_loss_config
from .router import (
    CollectedLosses,
    Router,
    RouterOutput,
    TokenContext,
    calibrate_weight,
    clear_router_losses,
    collect_router_losses,
    collect_routing_stats,
    iter_routers,
    restore_loss_weights,
    set_token_context,
    steer_balance,
    step_score_biases,
)

__all__ = [
    "AuxLossConfig",
    "CollectedLosses",
    "LossConfig",
    "LossInputs",
    "LossTermConfig",
    "LOSSES",
    "OrthogonalityLossConfig",
    "Router",
    "RouterConfig",
    "RouterOutput",
    "TokenContext",
    "VarianceLossConfig",
    "ZLossConfig",
    "calibrate_weight",
    "clear_router_losses",
    "collect_router_losses",
    "collect_routing_stats",
    "iter_routers",
    "losses",
    "metrics",
    "restore_loss_weights",
    "routing_loss",
    "set_token_context",
    "steer_balance",
    "step_score_biases",
    "validate_loss_config",
    "validate_router_config",
]
