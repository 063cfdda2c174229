"""moespec: expert specialization for Mixture-of-Experts fine-tuning."""

__version__ = "0.1.0"
