"""vaemo: train and evaluate VAEmotionLLM, a vision-language model that learns to hear by seeing."""

__version__ = "0.1.0"
