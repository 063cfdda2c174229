"""A routing loss of your own: the mean routing entropy, minimised (sharper, more decisive routing).

Registered from outside moespec and switched on from the command line:

    moespec-train experiment=smoke 'loss.modules=[examples/entropy_loss.py]' \\
        +loss.terms.entropy.weight=auto +loss.terms.entropy.target=1e-3

``loss.terms.entropy.options`` become keyword arguments (``+loss.terms.entropy.options.eps=1e-6``).
"""

import torch

from moespec.routing import routing_loss


@routing_loss("entropy", reads="scores", target=1e-3)
def entropy_loss(scores: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of each token's routing distribution [T,E]."""
    p = scores.float()
    return -(p * (p + eps).log()).sum(-1).mean()
