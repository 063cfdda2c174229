"""Training: data pipeline, losses, and the DeepSpeed trainer."""
