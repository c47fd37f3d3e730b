"""Real models zupatch fetches and converts once: SmolLM2-135M-Instruct (the demo) and Gemma 3 270M."""

from zupatch.models.smollm2 import DemoDownloadError, default_cache_dir, demo_checkpoint, demo_checkpoint_dir

__all__ = ["DemoDownloadError", "default_cache_dir", "demo_checkpoint", "demo_checkpoint_dir"]
