"""Distributed training: Ray Train launches DeepSpeed ZeRO-3 workers that run the stage objectives."""
