"""The Hugging Face Hub: patch references, pushing patches and patched checkpoints, model cards.

Library entry points::

    from zupatch.hub import resolve_patch, push_patch
    path = resolve_patch("alice/forget-paris")            # a local file, or a Hub repo's patch, via the HF cache
    result = push_patch("forget-paris.zup.safetensors", "alice/forget-paris")  # repo + card, no-op if unchanged

See docs/publishing.md.
"""

from zupatch.hub.card import AdapterCardInfo, PatchCardInfo, adapter_card, checkpoint_card, patch_card
from zupatch.hub.errors import hub_error
from zupatch.hub.pull import (
    PATCH_FILENAME,
    HubRef,
    ResolvedPatch,
    base_revision_note,
    hub_output,
    load_patch,
    locate_patch,
    parse_hub_ref,
    resolve_patch,
)
from zupatch.hub.push import PushResult, push_adapter, push_checkpoint, push_patch, require_token

__all__ = [
    "PATCH_FILENAME",
    "AdapterCardInfo",
    "HubRef",
    "PatchCardInfo",
    "PushResult",
    "ResolvedPatch",
    "adapter_card",
    "base_revision_note",
    "checkpoint_card",
    "hub_error",
    "hub_output",
    "load_patch",
    "locate_patch",
    "parse_hub_ref",
    "patch_card",
    "push_adapter",
    "push_checkpoint",
    "push_patch",
    "require_token",
    "resolve_patch",
]
