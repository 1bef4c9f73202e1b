"""megatron_rcpa: Reinforced Curriculum Pre-Alignment for vision-language models on Megatron-Core."""

__version__ = "0.1.0"
