"""A Hugging Face Hub on loopback, for tests.

`LoopbackHub` is a small threaded HTTP server (standard library only) bound to
127.0.0.1 on an ephemeral port. It implements the part of the Hub HTTP API that
the *real* ``huggingface_hub`` client (written against 2.4.0) uses to create
repos, commit (regular and LFS files, pull requests, branches, tags), list and
download files, so tests exercise the client end to end over HTTP without
mocking any of its Python functions.

Pointing the client at it
-------------------------
``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_DISABLE_XET``,
``HF_HUB_OFFLINE``... once, at import time, into ``huggingface_hub.constants``;
setting the environment variables in a test is therefore not enough once the
package is imported. Worse, the module-level functions
(``huggingface_hub.create_repo``, ``upload_file``, ...) are bound methods of a
module-level ``HfApi()`` whose ``endpoint`` was frozen at import.
`LoopbackHub.client_environment` (used by the ``loopback_hub`` fixture) does
all of the following and undoes it on exit:

* sets the environment variables (``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``,
  ``HF_HOME``, ``HF_HUB_CACHE``, telemetry and update checks off) and removes
  ``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, ``HF_HUB_OFFLINE`` and
  ``TRANSFORMERS_OFFLINE``, so subprocesses and late importers see the hub;
* patches the attributes of ``huggingface_hub.constants`` the client reads at
  call time (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``,
  ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``,
  ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``, ``HF_HUB_DISABLE_XET``,
  ``HF_HUB_OFFLINE``, ...);
* patches ``huggingface_hub.hf_api.api.endpoint`` (the default ``HfApi``), the
  two ``from ..constants import`` copies in ``utils._cache_manager`` /
  ``utils._cache_assets`` and the trusted-origin set of ``utils._http``;
* closes the client's shared ``httpx`` session on enter and exit.

After that, plain calls (``huggingface_hub.upload_file(...)``,
``hf_hub_download(...)``, ``HfApi()``) all talk to the loopback hub. Passing
``endpoint=hub.endpoint`` explicitly (``HfApi(endpoint=...)``,
``hf_hub_download(..., endpoint=...)``) also works but is not enough on its
own: the cache folders, the Xet switch and the token lookup are still read
from ``constants``. ``HF_HUB_DISABLE_XET`` matters: when ``hf_xet`` is
installed (it is in this venv) the client uploads LFS content through Xet
unless ``constants.HF_HUB_DISABLE_XET`` is true; this server only speaks the
classic LFS batch protocol.

Because the environment variables are set too, a *subprocess* started inside
the block (e.g. the ``zupatch`` CLI) imports ``huggingface_hub`` fresh and
talks to the hub with no patching at all (checked: env vars set before import
are sufficient, including ``HF_HUB_DISABLE_XET=1`` for classic LFS). Give it a
token through ``HF_TOKEN`` in its environment.

Fixture
-------
``loopback_hub`` (defined at the bottom) yields a running `LoopbackHub` with
`DEFAULT_TOKENS` (``hub.token`` is alice's; ``hf_bob_token`` is bob's) inside
``client_environment(<fresh tmp HF_HOME>)``; no token is configured client-side.
Make it visible to a test module with ``from hub_server import loopback_hub``
(pytest puts ``tests/`` on ``sys.path`` when ``tests`` has no ``__init__.py``),
or ``from tests.hub_server import loopback_hub`` when the repo root is on the
path; ``tests/conftest.py`` can do the same import once for all modules.

The server is stopped with `LoopbackHub.stop` and restarted on the same port
with `LoopbackHub.start`; ``with hub.down(): ...`` simulates the network being
down (connections refused). Mind the client's retries when the network is
down: a cached file (``hf_hub_download``/``snapshot_download``) falls back to
the cache at once, but ``hf_hub_download`` of a file that is *not* cached
retries its HEAD with backoff (1+2+4+8+8 s, ~23 s) before raising
``LocalEntryNotFoundError``, and so does every upload (the preupload POST goes
through ``http_backoff``). ``repo_info``, ``whoami``, ``create_repo`` and the
commit POST fail at once. The same retries apply to 429/5xx answers, e.g.
from `LoopbackHub.inject_error`.

With telemetry on (not the case inside ``client_environment``), the first
request of a process is preceded by ``GET /api/agent-harnesses`` (3 s timeout);
the server answers it with an empty registry.

What the server implements (paths relative to the endpoint)::

    GET  /api/whoami-v2                         GET /api/agent-harnesses
    POST /api/repos/create                      DELETE /api/repos/delete
    POST /api/validate-yaml
    GET  /api/{type}s/{repo}[/revision/{rev}]   PUT /api/{type}s/{repo}/settings
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]
    POST /api/{type}s/{repo}/paths-info/{rev}
    GET  /api/{type}s/{repo}/refs               GET /api/{type}s/{repo}/commits/{rev}
    POST /api/{type}s/{repo}/preupload/{rev}    POST /api/{type}s/{repo}/commit/{rev}
    POST|DELETE /api/{type}s/{repo}/branch/{branch}
    POST /api/{type}s/{repo}/tag/{rev}          DELETE /api/{type}s/{repo}/tag/{tag}
    POST /[{type}s/]{repo}.git/info/lfs/objects/batch
    PUT  <upload href>                          POST <verify href>
    HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}

Rules worth knowing when writing tests:

* Tokens map to user names; ``orgs`` maps organisation names to members.
  A write needs a valid token of a member of the repo's namespace (else 401
  without token, 403 with the wrong one); an unknown token gets 401 with
  ``X-Error-Message: Invalid credentials in Authorization header`` on any
  request, like the Hub. Private repos answer 404 ``RepoNotFound`` to anyone
  who may not read them. ``create_pr=True`` only needs read access.
* A new repo has an initial commit by ``system`` holding the Hub's default
  ``.gitattributes`` (``*.safetensors``, ``*.bin``, ``*.pt``... go to LFS).
  A file goes to LFS when ``.gitattributes`` says so, when it is at least
  ``lfs_threshold`` bytes (10 MiB) or when its first 512 bytes hold a NUL byte.
* Every commit gets a fresh sha1 commit id; every revision stays readable by
  its commit id (full id or a unique prefix of at least 7 characters).
* The preupload answer carries ``oid`` of the file already at that path (git
  blob sha1 for regular files, sha256 for LFS files), which is what lets the
  client skip unchanged files.
* On an http (not https) endpoint the client maps a 401 on a repo API URL to
  plain `HfHubHTTPError` rather than `RepositoryNotFoundError` (its regex for
  that case requires ``https://``); assert on ``err.response.status_code``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import fnmatch
import hashlib
import http.server
import itertools
import json
import os
import re
import secrets
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

try:  # the fixture needs pytest; the server itself does not
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

__all__ = [
    "Commit",
    "FileEntry",
    "LoopbackHub",
    "RequestRecord",
    "DEFAULT_TOKENS",
    "loopback_hub",
]

#: Tokens of the default fixture: ``alice`` (``hub.token``) and ``bob``.
DEFAULT_TOKENS: dict[str, str] = {"hf_test_token": "alice", "hf_bob_token": "bob"}

LFS_THRESHOLD = 10 * 1024 * 1024

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_PR_RE = re.compile(r"^refs/pr/(\d+)$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5",
        "*.joblib", "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz",
        "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth",
        "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
        "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


# --------------------------------------------------------------------------- model


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob (what the Hub calls ``oid``/``blobId``)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: _dt.datetime) -> str:
    return ts.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit's tree. Content lives in the hub's blob store under `sha256`."""

    path: str
    size: int
    sha256: str
    lfs: bool

    @property
    def git_oid(self) -> str:
        if self.lfs:
            return git_blob_id(lfs_pointer(self.sha256, self.size))
        return self._content_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    # set by `_make_entry` for regular files (avoids keeping the bytes here)
    _content_oid: str = field(default="", repr=False, compare=False)

    @property
    def etag(self) -> str:
        """What the Hub sends as (linked) ETag: sha256 for LFS files, git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def preupload_oid(self) -> str:
        """What the preupload endpoint reports; equals the client's ``_local_oid`` for unchanged content."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    id: str
    parents: tuple[str, ...]
    files: Mapping[str, FileEntry]
    title: str
    message: str
    author: str
    date: _dt.datetime


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: _dt.datetime
    sdk: str | None = None
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)
    next_discussion: int = 1

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by the server (for assertions on what the client did)."""

    method: str
    path: str  # raw path, query string removed
    status: int
    user: str | None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers=(), body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = list(headers)
        self.body = body


def _not_found_repo(repo_id: str) -> _HubError:
    return _HubError(404, "Repository not found", "RepoNotFound")


def _json(obj: Any, status: int = 200, headers=(), content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(obj).encode(), [("Content-Type", content_type), *headers])


# --------------------------------------------------------------------------- HTTP glue


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    hub: "LoopbackHub"  # set on the per-hub subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16) if line else 0
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        response = self.hub._handle(self.command, self.path, self.headers, body)
        self.send_response(response.status)
        names = {name.lower() for name, _ in response.headers}
        for name, value in response.headers:
            self.send_header(name, value)
        if "content-length" not in names:
            self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Connection", "close")  # no pooled connections survive `stop()`
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


# --------------------------------------------------------------------------- the hub


class LoopbackHub:
    """An in-memory Hugging Face Hub served over HTTP on 127.0.0.1.

    Args:
        tokens: valid tokens mapped to user names. ``hub.token`` is the first one.
        orgs: organisation name -> member user names (members may write there).
        lfs_threshold: files of at least this many bytes are uploaded through LFS.
        lfs_redirect: if true, HEAD/GET of an LFS file answer 302 to a "CDN" URL on
            ``localhost`` (another origin than ``127.0.0.1``), like the real Hub does
            with its signed S3/CloudFront URLs; otherwise LFS files are served directly.
        port: port to bind (0 = ephemeral).
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        orgs: Mapping[str, list[str] | tuple[str, ...] | set[str]] | None = None,
        lfs_threshold: int = LFS_THRESHOLD,
        lfs_redirect: bool = False,
        port: int = 0,
    ) -> None:
        self.tokens: dict[str, str] = dict(DEFAULT_TOKENS if tokens is None else tokens)
        if not self.tokens:
            raise ValueError("LoopbackHub needs at least one token")
        self.orgs: dict[str, set[str]] = {k: set(v) for k, v in (orgs or {}).items()}
        self.lfs_threshold = lfs_threshold
        self.lfs_redirect = lfs_redirect
        self._port = port
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._tickets: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._counter = itertools.count(1)
        self._faults: list[dict[str, Any]] = []
        self.requests: list[RequestRecord] = []
        #: requests that matched no route (method, path) - a missing endpoint shows up here
        self.unhandled: list[tuple[str, str]] = []
        #: tracebacks of server-side crashes (answered with HTTP 500)
        self.errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.start()

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def token(self) -> str:
        """The first token given (``hf_test_token`` for user ``alice`` by default)."""
        return next(iter(self.tokens))

    @property
    def user(self) -> str:
        return self.tokens[self.token]

    def token_for(self, user: str) -> str:
        for token, name in self.tokens.items():
            if name == user:
                return token
        raise KeyError(user)

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start serving (again, on the same port after `stop`). State is kept."""
        if self._server is not None:
            return
        handler = type("LoopbackHubHandler", (_Handler,), {"hub": self})
        self._server = _Server(("127.0.0.1", self._port), handler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-hub", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving: the port is closed and connections are refused. State is kept."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @contextlib.contextmanager
    def down(self) -> Iterator["LoopbackHub"]:
        """``with hub.down(): ...`` - the network is down inside the block."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def __enter__(self) -> "LoopbackHub":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget all repos, blobs, logs and injected faults."""
        with self._lock:
            self._repos.clear()
            self._blobs.clear()
            self._tickets.clear()
            self._faults.clear()
            self.requests.clear()
            self.unhandled.clear()
            self.errors.clear()

    # ------------------------------------------------------------------ client wiring

    @contextlib.contextmanager
    def client_environment(self, home: str | os.PathLike[str]) -> Iterator["LoopbackHub"]:
        """Point the installed ``huggingface_hub`` at this hub, with ``home`` as ``HF_HOME``.

        Everything is restored on exit. See the module docstring for what is patched.
        """
        import huggingface_hub
        from huggingface_hub import constants, hf_api
        from huggingface_hub.utils import _cache_assets, _cache_manager, _http

        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        hub_cache = str(home / "hub")
        assets_cache = str(home / "assets")
        token_path = str(home / "token")
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": hub_cache,
            "HF_ASSETS_CACHE": assets_cache,
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": token_path,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": None,
            "HF_TOKEN": None,
            "HUGGING_FACE_HUB_TOKEN": None,
            "HF_HUB_OFFLINE": None,
            "TRANSFORMERS_OFFLINE": None,
            "HUGGINGFACE_HUB_CACHE": None,
            "HUGGINGFACE_ASSETS_CACHE": None,
            "HUGGINGFACE_CO_STAGING": None,
        }
        host = "127.0.0.1"
        attrs: list[tuple[Any, str, Any]] = [
            (constants, "ENDPOINT", self.endpoint),
            (constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
            (constants, "HF_URL_HOSTS", frozenset(getattr(constants, "HF_URL_HOSTS", frozenset()) | {host})),
            (constants, "HF_HOME", str(home)),
            (constants, "default_cache_path", hub_cache),
            (constants, "default_assets_cache_path", assets_cache),
            (constants, "HUGGINGFACE_HUB_CACHE", hub_cache),
            (constants, "HUGGINGFACE_ASSETS_CACHE", assets_cache),
            (constants, "HF_HUB_CACHE", hub_cache),
            (constants, "HF_ASSETS_CACHE", assets_cache),
            (constants, "HF_XET_CACHE", str(home / "xet")),
            (constants, "default_xet_cache_path", str(home / "xet")),
            (constants, "HF_TOKEN_PATH", token_path),
            (constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens")),
            (constants, "CHECK_FOR_UPDATE_DONE_PATH", str(home / ".check_for_update_done")),
            (constants, "CHECK_FOR_SKILL_UPDATE_DONE_PATH", str(home / ".check_for_skill_update_done")),
            (constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json")),
            (constants, "HF_HUB_DISABLE_XET", True),
            (constants, "HF_HUB_OFFLINE", False),
            (constants, "HF_HUB_DISABLE_TELEMETRY", True),
            (constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False),
            (constants, "HF_HUB_DISABLE_UPDATE_CHECK", True),
            (hf_api.api, "endpoint", self.endpoint),
            (_cache_manager, "HF_HUB_CACHE", hub_cache),
            (_cache_assets, "HF_ASSETS_CACHE", assets_cache),
        ]
        if hasattr(_http, "_HUB_ORIGINS"):  # recent versions: origins whose redirects keep the token
            attrs.append((_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {("http", host, self._port)})))
        saved_env = {name: os.environ.get(name) for name in env}
        saved_attrs = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in attrs]
        try:
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            for obj, name, value in attrs:
                setattr(obj, name, value)
            huggingface_hub.close_session()
            yield self
        finally:
            huggingface_hub.close_session()
            for obj, name, value in reversed(saved_attrs):
                if value is _MISSING:
                    delattr(obj, name)
                else:
                    setattr(obj, name, value)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    @staticmethod
    @contextlib.contextmanager
    def offline() -> Iterator[None]:
        """``HF_HUB_OFFLINE=1`` inside the block (env var and ``constants``), restored on exit."""
        from huggingface_hub import constants

        saved_env, saved_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved_const
            if saved_env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = saved_env

    # ------------------------------------------------------------------ faults

    def inject_error(
        self,
        path_regex: str,
        status: int = 500,
        *,
        method: str | None = None,
        times: int = 1,
        message: str = "Injected failure",
    ) -> None:
        """Answer the next `times` requests whose path matches `path_regex` with `status`.

        Beware: the client retries 429/5xx on most endpoints (with sleeps); 4xx other than 429 fail at once.
        """
        with self._lock:
            self._faults.append(
                {"re": re.compile(path_regex), "status": status, "method": method, "left": times, "message": message}
            )

    # ------------------------------------------------------------------ state helpers for tests

    def _repo_or_raise(self, repo_id: str, repo_type: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the loopback hub")
        return repo

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._repo_or_raise(repo_id, repo_type).private

    def resolve(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit id that `revision` (branch, tag, refs/pr/N or commit id) points to."""
        with self._lock:
            repo = self._repo_or_raise(repo_id, repo_type)
            commit_id = self._resolve(repo, revision)
            if commit_id is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id!r}")
            return commit_id

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """First-parent history of `revision`, newest first (the initial ``system`` commit is last)."""
        with self._lock:
            repo = self._repo_or_raise(repo_id, repo_type)
            head = self.resolve(repo_id, revision, repo_type)
            return self._history(repo, head)

    def entries(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, FileEntry]:
        with self._lock:
            repo = self._repo_or_raise(repo_id, repo_type)
            return dict(repo.commits[self.resolve(repo_id, revision, repo_type)].files)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of every file at `revision`."""
        with self._lock:
            return {p: self._blobs[e.sha256] for p, e in self.entries(repo_id, revision, repo_type).items()}

    def lfs_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        """Paths stored through LFS at `revision`."""
        return {p for p, e in self.entries(repo_id, revision, repo_type).items() if e.lfs}

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repo_or_raise(repo_id, repo_type).branches)

    def tags(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repo_or_raise(repo_id, repo_type).tags)

    def pull_requests(self, repo_id: str, repo_type: str = "model") -> dict[int, str]:
        """PR number -> head commit id of ``refs/pr/N``."""
        with self._lock:
            return dict(self._repo_or_raise(repo_id, repo_type).prs)

    def requests_matching(self, method: str | None = None, path_regex: str = "") -> list[RequestRecord]:
        rx = re.compile(path_regex)
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and rx.search(r.path)]

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> None:
        """Seed a repo directly (no HTTP, no auth), with the usual initial commit."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_id!r} exists")
            self._new_repo(repo_type, repo_id, private, sdk=None)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        delete: tuple[str, ...] | list[str] = (),
        message: str = "seed commit",
        revision: str = "main",
        author: str | None = None,
        repo_type: str = "model",
    ) -> str:
        """Seed a commit directly (no HTTP, no auth). Returns the new commit id."""
        with self._lock:
            repo = self._repo_or_raise(repo_id, repo_type)
            base = self._resolve(repo, revision)
            if base is None:
                raise KeyError(revision)
            tree = dict(repo.commits[base].files)
            for path in delete:
                tree.pop(path, None)
            for path, content in (files or {}).items():
                data = content.encode() if isinstance(content, str) else bytes(content)
                lfs = self._should_be_lfs(repo, base, path, len(data), data[:512])
                tree[path] = self._store(repo, path, data, lfs)
            commit = self._add_commit(repo, base, tree, message, "", author or repo.namespace)
            self._move_ref(repo, revision, commit.id)
            return commit.id

    # ------------------------------------------------------------------ internals: model

    def _store(self, repo: _Repo, path: str, data: bytes, lfs: bool) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        self._blobs[sha] = data
        if lfs:
            repo.lfs_oids.add(sha)
            return FileEntry(path=path, size=len(data), sha256=sha, lfs=True)
        return FileEntry(path=path, size=len(data), sha256=sha, lfs=False, _content_oid=git_blob_id(data))

    def _new_repo(self, repo_type: str, repo_id: str, private: bool, sdk: str | None) -> _Repo:
        now = _dt.datetime.now(_dt.timezone.utc)
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now, sdk=sdk)
        tree = {".gitattributes": self._store(repo, ".gitattributes", DEFAULT_GITATTRIBUTES.encode(), False)}
        commit = self._add_commit(repo, None, tree, "initial commit", "", "system")
        repo.branches["main"] = commit.id
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _add_commit(
        self, repo: _Repo, parent: str | None, tree: dict[str, FileEntry], title: str, message: str, author: str
    ) -> Commit:
        now = _dt.datetime.now(_dt.timezone.utc)
        listing = "".join(f"{p}\0{e.git_oid}\n" for p, e in sorted(tree.items()))
        raw = (
            f"tree {hashlib.sha1(listing.encode()).hexdigest()}\nparent {parent or ''}\n"
            f"author {author} {now.timestamp()!r} #{next(self._counter)}\n\n{title}\n\n{message}"
        )
        commit_id = hashlib.sha1(raw.encode()).hexdigest()
        commit = Commit(
            id=commit_id,
            parents=(parent,) if parent else (),
            files=dict(tree),
            title=title,
            message=message,
            author=author,
            date=now,
        )
        repo.commits[commit_id] = commit
        return commit

    def _history(self, repo: _Repo, head: str) -> list[Commit]:
        out, current = [], head
        while current:
            commit = repo.commits[current]
            out.append(commit)
            current = commit.parents[0] if commit.parents else None
        return out

    def _resolve(self, repo: _Repo, rev: str) -> str | None:
        if rev.startswith("refs/heads/"):
            return repo.branches.get(rev[len("refs/heads/") :])
        if rev.startswith("refs/tags/"):
            return repo.tags.get(rev[len("refs/tags/") :])
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        m = _PR_RE.match(rev)
        if m:
            return repo.prs.get(int(m.group(1)))
        if _HEX_RE.match(rev):
            if rev in repo.commits:
                return rev
            matches = [c for c in repo.commits if c.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        return None

    def _move_ref(self, repo: _Repo, rev: str, commit_id: str) -> None:
        m = _PR_RE.match(rev)
        if m and int(m.group(1)) in repo.prs:
            repo.prs[int(m.group(1))] = commit_id
            return
        branch = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        if branch not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        repo.branches[branch] = commit_id

    def _gitattributes_lfs(self, repo: _Repo, commit_id: str, path: str) -> bool:
        entry = repo.commits[commit_id].files.get(".gitattributes")
        if entry is None:
            return False
        for line in self._blobs[entry.sha256].decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) < 2 or line.lstrip().startswith("#"):
                continue
            pattern, attrs = parts[0], parts[1:]
            if "filter=lfs" not in attrs:
                continue
            target = path if "/" in pattern else path.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(target, pattern.replace("**/", "*")):
                return True
        return False

    def _should_be_lfs(self, repo: _Repo, commit_id: str, path: str, size: int, sample: bytes) -> bool:
        if size == 0:
            return False
        return size >= self.lfs_threshold or b"\0" in sample or self._gitattributes_lfs(repo, commit_id, path)

    # ------------------------------------------------------------------ internals: HTTP

    def _user_of(self, headers: Any) -> str | None:
        auth = headers.get("Authorization") or ""
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise _HubError(401, _INVALID_CREDENTIALS)
        return self.tokens[token.strip()]

    def _members(self, namespace: str) -> set[str]:
        return {namespace} | self.orgs.get(namespace, set())

    def _can_read(self, repo: _Repo, user: str | None) -> bool:
        return not repo.private or (user is not None and user in self._members(repo.namespace))

    def _require_write_ns(self, namespace: str, user: str | None, what: str) -> None:
        if user is None:
            raise _HubError(401, "You must be authenticated to perform this action")
        if user not in self._members(namespace):
            raise _HubError(403, f"You don't have the rights to {what} under the namespace \"{namespace}\"")

    def _get_repo(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or not self._can_read(repo, user):
            raise _not_found_repo(repo_id)
        return repo

    def _rev_or_404(self, repo: _Repo, rev: str) -> str:
        commit_id = self._resolve(repo, rev)
        if commit_id is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit_id

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> _Response:
        split = urlsplit(raw_path)
        path, query = split.path, parse_qs(split.query, keep_blank_values=True)
        user: str | None = None
        try:
            with self._lock:
                for fault in self._faults:
                    if fault["left"] > 0 and fault["re"].search(path) and fault["method"] in (None, method):
                        fault["left"] -= 1
                        raise _HubError(fault["status"], fault["message"])
                self._faults = [f for f in self._faults if f["left"] > 0]
            user = self._user_of(headers)
            response = self._route(method, path, query, headers, body, user)
        except _HubError as err:
            response = _json(err.body if err.body is not None else {"error": err.message}, err.status, err.headers)
            safe = err.message.replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
            response.headers.append(("X-Error-Message", safe))
            if err.code:
                response.headers.append(("X-Error-Code", err.code))
        except Exception:  # a bug in this server: make it visible
            tb = traceback.format_exc()
            self.errors.append(tb)
            response = _json({"error": "loopback hub crashed: " + tb.splitlines()[-1]}, 500)
        request_id = headers.get("X-Amzn-Trace-Id") or headers.get("X-Request-Id")
        if request_id:
            response.headers.append(("X-Request-Id", request_id))
        with self._lock:
            self.requests.append(RequestRecord(method, path, response.status, user))
        return response

    def _route(self, method: str, path: str, query: dict, headers: Any, body: bytes, user: str | None) -> _Response:
        segs = [unquote(s) for s in path.split("/")[1:]]
        with self._lock:
            if segs[:1] == ["api"]:
                rest = segs[1:]
                if rest == ["whoami-v2"] and method == "GET":
                    return self._whoami(user)
                if rest == ["agent-harnesses"] and method == "GET":
                    return _json({"standardEnvVars": [], "harnesses": {}})
                if rest == ["repos", "create"] and method == "POST":
                    return self._create_repo(_loads(body), user)
                if rest == ["repos", "delete"] and method == "DELETE":
                    return self._delete_repo(_loads(body), user)
                if rest == ["validate-yaml"] and method == "POST":
                    return self._validate_yaml(_loads(body))
                if len(rest) >= 3 and rest[0] in _REPO_TYPES:
                    repo_type, repo_id = _REPO_TYPES[rest[0]], f"{rest[1]}/{rest[2]}"
                    return self._repo_api(method, repo_type, repo_id, rest[3:], query, headers, body, user)
            elif segs[:2] == ["_loopback", "lfs"] and len(segs) == 3 and method == "PUT":
                return self._lfs_put(segs[2], body)
            elif segs[:2] == ["_loopback", "lfs-verify"] and len(segs) == 3 and method == "POST":
                return self._lfs_verify(segs[2], _loads(body))
            elif segs[:2] == ["_loopback", "cdn"] and len(segs) == 3 and method in ("GET", "HEAD"):
                data = self._blobs.get(segs[2])
                if data is None:
                    raise _HubError(404, "No such object")
                return self._serve_bytes(data, headers, [("ETag", f'"{segs[2]}"')])
            else:
                repo_type = "model"
                if segs and segs[0] in ("datasets", "spaces", "kernels"):
                    repo_type, segs = _REPO_TYPES[segs[0]], segs[1:]
                if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
                    if method == "POST":
                        return self._lfs_batch(repo_type, f"{segs[0]}/{segs[1][:-4]}", _loads(body), user)
                if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
                    return self._resolve_file(repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), headers, user)
            self.unhandled.append((method, path))
            raise _HubError(404, f"LoopbackHub: no route for {method} {path}")

    # ---------------------------------------------------------------- endpoints

    def _whoami(self, user: str | None) -> _Response:
        if user is None:
            raise _HubError(401, _INVALID_CREDENTIALS)
        orgs = [{"type": "org", "name": org, "fullname": org} for org, members in self.orgs.items() if user in members]
        return _json(
            {
                "type": "user",
                "id": hashlib.md5(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.capitalize(),
                "email": f"{user}@loopback.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict, user: str | None) -> _Response:
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        if user is None:
            raise _HubError(401, "You must be authenticated to create a repo")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or user
        if not _NAME_RE.match(name) or "--" in name or ".." in name or name.endswith((".git", ".")):
            raise _HubError(400, f"Invalid repo name: {name!r}")
        self._require_write_ns(namespace, user, f"create a {repo_type}")
        repo_id = f"{namespace}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            url = self._repo_url(existing)
            raise _HubError(409, f"You already created this {repo_type} repo", body={
                "error": f"You already created this {repo_type} repo", "url": url})
        visibility = payload.get("visibility")
        private = bool(payload.get("private")) if visibility is None else visibility != "public"
        repo = self._new_repo(repo_type, repo_id, private, sdk=payload.get("sdk"))
        return _json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict, user: str | None) -> _Response:
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or user or ""
        repo_id = f"{namespace}/{payload.get('name')}"
        repo = self._get_repo(repo_type, repo_id, user)
        self._require_write_ns(repo.namespace, user, f"delete a {repo_type}")
        del self._repos[(repo_type, repo_id)]
        return _json({})

    def _validate_yaml(self, payload: dict) -> _Response:
        content = payload.get("content") or ""
        if content.startswith("---"):
            block = content[3:].split("\n---", 1)
            try:
                import yaml

                meta = yaml.safe_load(block[0]) if len(block) == 2 else None
                if len(block) != 2 or not (meta is None or isinstance(meta, dict)):
                    raise ValueError("metadata must be a YAML mapping between '---' lines")
            except Exception as exc:  # noqa: BLE001 - report any parse error to the client
                return _json({"errors": [{"message": str(exc)}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _repo_api(
        self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict, headers: Any,
        body: bytes, user: str | None,
    ) -> _Response:
        repo = self._get_repo(repo_type, repo_id, user)
        op = rest[0] if rest else ""
        if method == "GET" and (not rest or (op == "revision" and len(rest) >= 2)):
            rev = "/".join(rest[1:]) if rest else "main"
            return self._repo_info(repo, self._rev_or_404(repo, rev), query)
        if method == "GET" and op == "tree" and len(rest) >= 2:
            return self._tree(repo, self._rev_or_404(repo, rest[1]), "/".join(rest[2:]).strip("/"), query)
        if method == "POST" and op == "paths-info" and len(rest) == 2:
            return self._paths_info(repo, self._rev_or_404(repo, rest[1]), body, headers)
        if method == "GET" and rest == ["refs"]:
            return self._refs(repo, query)
        if method == "GET" and op == "commits" and len(rest) == 2:
            head = self._rev_or_404(repo, rest[1])
            return _json([self._commit_json(c) for c in self._history(repo, head)])
        if method == "POST" and op == "preupload" and len(rest) == 2:
            return self._preupload(repo, rest[1], _loads(body), query, user)
        if method == "POST" and op == "commit" and len(rest) == 2:
            return self._commit(repo, rest[1], body, query, user)
        if op == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            self._require_write_ns(repo.namespace, user, "write a repo")
            return self._branch(repo, rest[1], method, _loads(body))
        if op == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
            self._require_write_ns(repo.namespace, user, "write a repo")
            return self._tag(repo, rest[1], method, _loads(body))
        if method == "PUT" and rest == ["settings"]:
            self._require_write_ns(repo.namespace, user, "change the settings of a repo")
            payload = _loads(body)
            if "visibility" in payload:
                repo.private = payload["visibility"] != "public"
            elif "private" in payload:
                repo.private = bool(payload["private"])
            return _json({})
        self.unhandled.append((method, "/api/.../" + "/".join(rest)))
        raise _HubError(404, f"LoopbackHub: no route for {method} {repo_type} {repo_id} {'/'.join(rest)}")

    def _repo_info(self, repo: _Repo, commit_id: str, query: dict) -> _Response:
        commit = repo.commits[commit_id]
        blobs = _flag(query, "blobs")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sib["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.md5(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": commit_id,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(self._blobs[e.sha256]) for e in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info["sdk"] = repo.sdk
        return _json(info)

    def _entry_json(self, repo: _Repo, commit_id: str, entry: FileEntry, expand: bool) -> dict:
        out: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": entry.path}
        if entry.lfs:
            out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            out["lastCommit"] = self._last_commit(repo, commit_id, lambda files: files.get(entry.path))
        return out

    def _dir_json(self, repo: _Repo, commit_id: str, files: Mapping[str, FileEntry], path: str, expand: bool) -> dict:
        prefix = path + "/"

        def subtree(tree: Mapping[str, FileEntry]) -> str:
            listing = "".join(f"{p}\0{e.git_oid}\n" for p, e in sorted(tree.items()) if p.startswith(prefix))
            return hashlib.sha1(listing.encode()).hexdigest()

        out: dict[str, Any] = {"type": "directory", "oid": subtree(files), "size": 0, "path": path}
        if expand:
            out["lastCommit"] = self._last_commit(repo, commit_id, subtree)
        return out

    def _last_commit(self, repo: _Repo, commit_id: str, key) -> dict:
        history = self._history(repo, commit_id)
        found = history[0]
        for older in history[1:]:
            if key(older.files) != key(found.files):
                break
            found = older
        return {"id": found.id, "title": found.title, "date": _iso(found.date)}

    def _tree(self, repo: _Repo, commit_id: str, path: str, query: dict) -> _Response:
        files = repo.commits[commit_id].files
        recursive, expand = _flag(query, "recursive"), _flag(query, "expand")
        prefix = path + "/" if path else ""
        if path and not any(p.startswith(prefix) for p in files):
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", [("X-Repo-Commit", commit_id)])
        out, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                out.append(self._entry_json(repo, commit_id, files[p], expand))
        out = [self._dir_json(repo, commit_id, files, d, expand) for d in sorted(dirs)] + out
        return _json(out)

    def _paths_info(self, repo: _Repo, commit_id: str, body: bytes, headers: Any) -> _Response:
        if "json" in (headers.get("Content-Type") or ""):
            payload = _loads(body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand", ["false"])[0].lower() in ("1", "true"))
        files = repo.commits[commit_id].files
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(self._entry_json(repo, commit_id, files[path], expand))
            elif any(p.startswith(path + "/") for p in files):
                out.append(self._dir_json(repo, commit_id, files, path, expand))
        return _json(out)

    def _refs(self, repo: _Repo, query: dict) -> _Response:
        out: dict[str, Any] = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
        }
        if _flag(query, "include_prs"):
            out["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c} for n, c in sorted(repo.prs.items())
            ]
        return _json(out)

    def _commit_json(self, commit: Commit) -> dict:
        return {
            "id": commit.id,
            "title": commit.title,
            "message": commit.message,
            "date": _iso(commit.date),
            "authors": [{"user": commit.author, "avatar": ""}],
        }

    def _check_commit_access(self, repo: _Repo, create_pr: bool, user: str | None) -> None:
        if create_pr:
            if user is None:
                raise _HubError(401, "You must be authenticated to open a pull request")
            return  # readers may open PRs (the repo was already found readable)
        self._require_write_ns(repo.namespace, user, "write a repo")

    def _preupload(self, repo: _Repo, rev: str, payload: dict, query: dict, user: str | None) -> _Response:
        create_pr = _flag(query, "create_pr")
        self._check_commit_access(repo, create_pr, user)
        base = self._rev_or_404(repo, rev)
        files = repo.commits[base].files
        ignore = payload.get("gitIgnore")
        if ignore is None and ".gitignore" in files:
            ignore = self._blobs[files[".gitignore"].sha256].decode(errors="replace")
        out = []
        for item in payload.get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample") or "")
            lfs = self._should_be_lfs(repo, base, path, int(item.get("size", 0)), sample)
            existing = files.get(path)
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": _gitignored(ignore, path),
                    "oid": existing.preupload_oid if existing else None,
                }
            )
        return _json({"files": out, "commitOid": base})

    def _lfs_batch(self, repo_type: str, repo_id: str, payload: dict, user: str | None) -> _Response:
        repo = self._get_repo(repo_type, repo_id, user)
        if payload.get("operation") != "upload":
            raise _HubError(400, "LoopbackHub only implements LFS uploads (downloads go through /resolve)")
        ref = (payload.get("ref") or {}).get("name")
        self._check_commit_access(repo, ref is None, user)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in repo.lfs_oids:
                ticket = secrets.token_hex(16)
                self._tickets[ticket] = ((repo_type, repo_id), oid, size)
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_loopback/lfs/{ticket}", "header": {}},
                    "verify": {"href": f"{self.endpoint}/_loopback/lfs-verify/{ticket}", "header": {}},
                }
            objects.append(item)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                     content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, ticket: str, body: bytes) -> _Response:
        if ticket not in self._tickets:
            raise _HubError(403, "Unknown or expired upload URL")
        key, oid, size = self._tickets[ticket]
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        repo = self._repos.get(key)
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        self._blobs[oid] = body
        repo.lfs_oids.add(oid)
        return _Response(200, b"", [("ETag", f'"{hashlib.md5(body).hexdigest()}"')])

    def _lfs_verify(self, ticket: str, payload: dict) -> _Response:
        if ticket not in self._tickets:
            raise _HubError(403, "Unknown or expired verify URL")
        key, oid, size = self._tickets[ticket]
        repo = self._repos.get(key)
        if repo is None or oid not in repo.lfs_oids or payload.get("oid") != oid or int(payload.get("size", -1)) != size:
            raise _HubError(422, f"LFS object {oid} was not uploaded")
        return _json({"success": True})

    def _commit(self, repo: _Repo, rev: str, body: bytes, query: dict, user: str | None) -> _Response:
        create_pr = _flag(query, "create_pr")
        self._check_commit_access(repo, create_pr, user)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "First NDJSON line must be the header")
        header = lines[0]["value"]
        base = self._rev_or_404(repo, rev)
        if not create_pr:
            m = _PR_RE.match(rev)
            branch = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
            if not (m and int(m.group(1)) in repo.prs) and branch not in repo.branches:
                raise _HubError(400, f"Cannot commit to {rev}: not a branch or a pull request ref")
        parent = header.get("parentCommit")
        if parent and not base.startswith(parent):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[base].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _check_path(value.get("path", ""))
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                tree[path] = self._store(repo, path, data, False)
            elif key == "lfsFile":
                oid = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_oids or oid not in self._blobs:
                    raise _HubError(400, f"LFS file {path} (oid {oid}) has not been uploaded to this repo")
                data = self._blobs[oid]
                if "size" in value and int(value["size"]) != len(data):
                    raise _HubError(400, f"LFS file {path}: size mismatch")
                tree[path] = FileEntry(path=path, size=len(data), sha256=oid, lfs=True)
            elif key == "deletedFile":
                if path not in tree:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}")
        commit = self._add_commit(
            repo, base, tree, header.get("summary") or "", header.get("description") or "", user or "anonymous"
        )
        url = self._repo_url(repo)
        out: dict[str, Any] = {"success": True, "commitOid": commit.id, "commitUrl": f"{url}/commit/{commit.id}"}
        if create_pr:
            num = repo.next_discussion
            repo.next_discussion += 1
            repo.prs[num] = commit.id
            out["pullRequestUrl"] = f"{url}/discussions/{num}"
        else:
            self._move_ref(repo, rev, commit.id)
        return _json(out)

    def _branch(self, repo: _Repo, branch: str, method: str, payload: dict) -> _Response:
        if method == "DELETE":
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise _HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _json({})
        if branch in repo.branches:
            raise _HubError(409, f"Reference refs/heads/{branch} already exists")
        if not branch or branch.startswith("refs/") or ".." in branch or branch.endswith("/"):
            raise _HubError(400, f"Invalid branch name: {branch!r}")
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = self._rev_or_404(repo, start)
        return _json({})

    def _tag(self, repo: _Repo, name: str, method: str, payload: dict) -> _Response:
        if method == "DELETE":
            if name not in repo.tags:
                raise _HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            del repo.tags[name]
            return _json({})
        tag = payload.get("tag")
        if not tag:
            raise _HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise _HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = self._rev_or_404(repo, name)
        return _json({})

    def _resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str, headers: Any, user: str | None) -> _Response:
        repo = self._get_repo(repo_type, repo_id, user)
        commit_id = self._rev_or_404(repo, rev)
        entry = repo.commits[commit_id].files.get(path)
        if entry is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", [("X-Repo-Commit", commit_id)])
        extra = [("X-Repo-Commit", commit_id), ("ETag", f'"{entry.etag}"')]
        if entry.lfs:
            extra += [("X-Linked-Etag", f'"{entry.sha256}"'), ("X-Linked-Size", str(entry.size))]
            if self.lfs_redirect:
                location = f"http://localhost:{self._port}/_loopback/cdn/{entry.sha256}"
                return _Response(302, b"", [("Location", location), *extra])
        return self._serve_bytes(self._blobs[entry.sha256], headers, extra)

    def _serve_bytes(self, data: bytes, headers: Any, extra: list[tuple[str, str]]) -> _Response:
        base = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"), *extra]
        rng = headers.get("Range")
        if rng:
            m = _RANGE_RE.match(rng)
            size = len(data)
            if m is None or (not m.group(1) and not m.group(2)):
                raise _HubError(416, f"Unsupported range {rng!r}", headers=[("Content-Range", f"bytes */{size}")])
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(size - int(m.group(2)), 0), size - 1
            if start >= size or start > end:
                raise _HubError(416, f"Unsatisfiable range {rng!r}", headers=[("Content-Range", f"bytes */{size}")])
            return _Response(206, data[start : end + 1], [*base, ("Content-Range", f"bytes {start}-{end}/{size}")])
        return _Response(200, data, base)


# --------------------------------------------------------------------------- helpers

_MISSING = object()


def _loads(body: bytes) -> dict:
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise _HubError(400, f"Invalid JSON body: {exc}") from exc
    return value if isinstance(value, dict) else {"_": value}


def _flag(query: dict, name: str) -> bool:
    values = query.get(name) or []
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "")


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    if ".git" in parts:
        raise _HubError(400, f"Cannot write under .git/: {path!r}")
    return path


def _gitignored(content: str | None, path: str) -> bool:
    if not content:
        return False
    ignored = False
    for line in content.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/")
        anchored = "/" in pattern.lstrip("/")
        pattern = pattern.lstrip("/")
        candidates = [path] if anchored else [path, *path.split("/")]
        dirs = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/"))]
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates) or any(
            fnmatch.fnmatchcase(d if anchored else d.rsplit("/", 1)[-1], pattern) for d in dirs
        ):
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------- pytest fixture

if pytest is not None:

    @pytest.fixture
    def loopback_hub(tmp_path_factory: "pytest.TempPathFactory") -> Iterator[LoopbackHub]:
        """A fresh `LoopbackHub` (tokens `DEFAULT_TOKENS`) with ``huggingface_hub`` pointed at it.

        ``HF_HOME`` is a fresh temporary folder; no token is configured on the client side
        (pass ``token=hub.token`` or set ``HF_TOKEN`` yourself). Everything is restored afterwards.
        """
        home = tmp_path_factory.mktemp("hf_home")
        with LoopbackHub() as hub, hub.client_environment(home):
            yield hub
