"""Hub failures as one-line errors (the token is never part of a message)."""

from __future__ import annotations

from zupatch.errors import ZupatchError


def hub_error(exc: Exception, repo_id: str, revision: str | None = None, filename: str | None = None) -> ZupatchError:
    """Translate a ``huggingface_hub`` (or network) exception into a ZupatchError."""
    from huggingface_hub import errors as hf

    where = repo_id if not filename else f"{repo_id}/{filename}"
    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, hf.RevisionNotFoundError):
        return ZupatchError(f"revision {revision!r} does not exist on the Hub", repo_id)
    if isinstance(exc, hf.GatedRepoError):
        return ZupatchError("this repository is gated: accept its terms on the Hub and log in", repo_id)
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ZupatchError(
            "repository not found on the Hub (or it is private and no valid token was given)", repo_id
        )
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return ZupatchError(
            f"not in the local Hugging Face cache{rev} and the Hub cannot be reached (offline mode or no network)",
            where,
        )
    if isinstance(exc, hf.EntryNotFoundError):  # after its subclass LocalEntryNotFoundError
        return ZupatchError(f"file not found in the repository{rev}", where)
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return ZupatchError("HF_HUB_OFFLINE=1 is set and this needs the Hub", where)
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return ZupatchError("permission denied by the Hub: check your token and its write access", where)
        return ZupatchError(f"the Hub answered HTTP {status}", where)
    name = exc.__class__.__name__
    if "Connect" in name or "Timeout" in name or isinstance(exc, OSError):
        return ZupatchError(f"cannot reach the Hub ({name})", where)
    return ZupatchError(f"Hub request failed ({name}: {str(exc).splitlines()[0] if str(exc) else ''})", where)
