"""fastclip: CLIP pretraining for throughput (DALI, DeepSpeed ZeRO, a fused contrastive loss)."""

__version__ = "0.1.0"
