"""Small file-system facts shared by the writers (patch files, checkpoint folders)."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask, so written files get the mode users expect (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
