"""Models zupatch ships helpers for: the SmolLM2-135M-Instruct demo checkpoint."""

from zupatch.models.demo import DemoDownloadError, default_cache_dir, demo_checkpoint, demo_checkpoint_dir

__all__ = ["DemoDownloadError", "default_cache_dir", "demo_checkpoint", "demo_checkpoint_dir"]
