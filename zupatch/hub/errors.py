"""Hub failures as one-line errors (the token is never part of a message)."""

from __future__ import annotations

from zupatch.errors import ZupatchError

LOGIN_HINT = "pass --token, set HF_TOKEN or run `hf auth login`"


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` (and of any ``hf_...`` token) masked."""
    import re

    if token:
        text = text.replace(token, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)


def _implicit_token() -> str | None:
    """The token huggingface_hub sends when none is passed (HF_TOKEN, or the login store)."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - only used to word a message
        return None


def hub_error(
    exc: Exception,
    repo_id: str,
    revision: str | None = None,
    filename: str | None = None,
    *,
    token: str | None = None,
    writing: bool = False,
) -> ZupatchError:
    """Translate a ``huggingface_hub`` (or network) exception into a ZupatchError.

    ``token`` is the token that was sent (or None): it is used only to choose the
    message and to make sure it never appears in it. ``writing`` says whether the
    request was a write (create, commit), which changes what a 401/403 means.
    """
    token = token or _implicit_token()
    error = _translate(exc, repo_id, revision, filename, token, writing)
    error.message = redact(error.message, token)
    return error


def _translate(
    exc: Exception, repo_id: str, revision: str | None, filename: str | None, token: str | None, writing: bool
) -> ZupatchError:
    from huggingface_hub import errors as hf

    where = repo_id if not filename else f"{repo_id}:{filename}"
    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, hf.RevisionNotFoundError):
        return ZupatchError(f"revision {revision!r} does not exist on the Hub", repo_id)
    if isinstance(exc, hf.GatedRepoError):
        return ZupatchError("this repository is gated: accept its terms on the Hub and log in", repo_id)
    if isinstance(exc, hf.RepositoryNotFoundError):
        hint = " and no token was given" if not token else " and this token cannot read it"
        return ZupatchError(f"repository not found on the Hub (or it is private{hint})", repo_id)
    if isinstance(exc, hf.LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, hf.HfHubHTTPError):  # the Hub answered (401, 404...): that is the real problem
            return _translate(cause, repo_id, revision, filename, token, writing)
        if isinstance(cause, hf.OfflineModeIsEnabled) or "HF_HUB_OFFLINE" in str(exc) or "local_files_only" in str(exc):
            return ZupatchError(f"not in the local Hugging Face cache{rev}, and HF_HUB_OFFLINE=1 forbids downloading it",
                                where)  # fmt: skip
        return ZupatchError(f"cannot reach the Hub, and it is not in the local Hugging Face cache{rev}", where)
    if isinstance(exc, hf.EntryNotFoundError):  # after its subclass LocalEntryNotFoundError
        return ZupatchError(f"file not found in the repository{rev}", where)
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return ZupatchError("HF_HUB_OFFLINE=1 is set and this needs the Hub", where)
    if isinstance(exc, hf.LocalTokenNotFoundError):
        return ZupatchError(f"this needs a Hugging Face token: {LOGIN_HINT}", where)
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            if not token:
                return ZupatchError(f"the Hub wants a token for this: {LOGIN_HINT}", where)
            if writing:
                return ZupatchError("the Hub rejected the token (invalid, expired, or without write access)", where)
            return ZupatchError("the Hub rejected the token (invalid or expired)", where)
        if status == 403:
            if writing:
                return ZupatchError(
                    f"no permission: this token cannot write to {repo_id.split('/')[0]!r} "
                    "(a token with write access to that user or organisation is needed)",
                    where,
                )
            return ZupatchError("no permission to read this with the given token", where)
        if status == 404:
            return ZupatchError(f"not found on the Hub{rev}", where)
        if status == 409:
            return ZupatchError("the Hub reported a conflict (someone pushed meanwhile?); try again", where)
        if status == 412:
            return ZupatchError("the branch moved while pushing; try again", where)
        if status is not None and status >= 500:
            return ZupatchError(f"the Hub had an internal error (HTTP {status}); try again later", where)
        server = getattr(exc, "server_message", None)
        detail = f": {server.splitlines()[0]}" if server else ""
        return ZupatchError(f"the Hub answered HTTP {status}{detail}", where)
    name = exc.__class__.__name__
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(k in name for k in ("Connect", "Timeout", "Network")):
        return ZupatchError(f"cannot reach the Hub ({name}): check the network", where)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ZupatchError(f"Hub request failed ({name}{': ' + first if first else ''})", where)
