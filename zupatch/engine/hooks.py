"""Small forward-hook helpers shared by statistics and target optimisation.

All of them are context managers that remove their hooks on exit, so a model
is never left with a hook attached after an error.

Stopping early: statistics and keys only need activations up to the last
edited layer, so a hook raises :class:`StopForward` there and
:func:`run_until_stopped` swallows it. This works for every architecture
without re-implementing its forward (masks, rotary embeddings, parallel
residuals), and is tested to give the same keys as a full forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn

Key = TypeVar("Key")


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once nothing more is needed."""


def run_until_stopped(forward: Callable[[], Any]) -> None:
    """Call ``forward()``; a :class:`StopForward` from a hook ends it quietly."""
    try:
        forward()
    except StopForward:
        pass


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, or first of a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


@contextmanager
def on_inputs(
    modules: Mapping[Key, nn.Module],
    callback: Callable[[Key, torch.Tensor], None],
    stop_at: Key | None = None,
) -> Iterator[None]:
    """Call ``callback(key, input)`` with each module's first input; stop after ``stop_at``."""

    def make_hook(key: Key):
        def hook(module: nn.Module, args: tuple) -> None:
            callback(key, args[0])
            if key == stop_at:
                raise StopForward

        return hook

    with ExitStack() as stack:
        for key, module in modules.items():
            stack.callback(module.register_forward_pre_hook(make_hook(key)).remove)
        yield


@contextmanager
def on_outputs(
    modules: Mapping[Key, nn.Module],
    callback: Callable[[Key, torch.Tensor], None],
    stop_at: Key | None = None,
) -> Iterator[None]:
    """Call ``callback(key, hidden_output)`` for each module; stop after ``stop_at``."""

    def make_hook(key: Key):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            callback(key, hidden_of(output))
            if key == stop_at:
                raise StopForward

        return hook

    with ExitStack() as stack:
        for key, module in modules.items():
            stack.callback(module.register_forward_hook(make_hook(key)).remove)
        yield


@contextmanager
def edit_output(module: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's hidden output ``h`` by ``edit(h)`` (keeps autograd)."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _with_hidden(output, edit(hidden_of(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class LayerInputCache:
    """The hidden states entering decoder layer ``start``, per prompt, so that later
    forwards of the same prompts skip layers ``0 .. start-1``.

    An edit of layers ``>= start`` leaves what reaches layer ``start``
    unchanged, yet the edit loop runs the same prompts again for every edited
    layer and every pass, and the target optimisation runs them at every step.
    Inside :meth:`batch`, a forward whose every row (a right-padded prompt) is
    held here replays: the layers before ``start`` run as identities and layer
    ``start`` gets the held states (zeros past each row's end: right padding
    is never attended to). Any other forward runs in full and records its
    rows. Layers before ``start`` must not change while the cache is used: it
    lives for one edit.

    At most ``max_bytes`` are held (later rows run in full); a model placed by
    accelerate (``hf_device_map``, whose hooks own each layer's forward) is
    never cached. The results are those of a full forward up to the float
    reassociation of kernels batched differently (tested against full
    forwards for every architecture family). :meth:`prefill` records many
    rows that begin alike at the cost of one shared start.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], start: int, max_bytes: int):
        self.layers = list(layers)
        self.start = start
        self.max_bytes = max_bytes if not hasattr(model, "hf_device_map") else 0
        self.held_bytes = 0
        self.replays = 0
        self._rows: dict[bytes, torch.Tensor] = {}
        self._output: tuple[bool, int] | None = None  # a skipped layer's output: (is a tuple, its length)

    def prefill(self, model: nn.Module, groups: Sequence[Sequence[Sequence[int]]], pad_id: int,
                batch_rows: int = 256) -> None:  # fmt: skip
        """Record the rows (token ids) not held yet, running what a group's rows share
        at their start once.

        The rows of a group (one context prefix followed by many prompts) share
        their first tokens: those run once with the model's attention cache
        kept, and each row's own tokens run on a copy of that cache, layers
        before ``start`` only. Rows of a group that share nothing run whole.
        The held states are those of a full forward up to float reassociation
        (attention over the shared part is read from the cache). Nothing is
        done unless every new row fits in the budget: :meth:`batch` replays
        only when all its rows are held.
        """
        if self.start == 0 or self.max_bytes <= 0:
            return
        groups = [[list(r) for r in dict.fromkeys(tuple(r) for r in g if _row_key(r) not in self._rows)] for g in groups]
        first = next(model.parameters())
        width = first.element_size() * model.get_input_embeddings().embedding_dim  # bytes per held token
        if self.held_bytes + sum(len(r) for g in groups for r in g) * width > self.max_bytes:
            return
        from transformers import DynamicCache

        device = first.device
        config = getattr(model, "config", None)
        cache_kwarg = cache_keyword(model)
        seen: dict[str, torch.Tensor] = {}

        def grab(hidden: torch.Tensor) -> None:
            seen["hidden"] = hidden
            raise StopForward

        def run(rows: list[list[int]], shared: list[int], cache: Any = None) -> None:
            """Rows that all begin with ``shared`` (its states and ``cache`` given when non-empty)."""
            for begin in range(0, len(rows), batch_rows):
                chunk = rows[begin : begin + batch_rows]
                own = [r[len(shared) :] for r in chunk]
                ids = torch.full((len(chunk), max(map(len, own))), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), len(shared) + ids.shape[1]), dtype=torch.long)
                for i, tokens in enumerate(own):
                    ids[i, : len(tokens)] = torch.tensor(tokens)
                    mask[i, : len(shared) + len(tokens)] = 1
                options: dict[str, Any] = {"attention_mask": mask.to(device), "use_cache": cache is not None}
                if cache is not None:
                    batch_cache = DynamicCache(config=config)
                    for index, keys, values in _cache_layers(cache):
                        batch_cache.update(keys.expand(len(chunk), -1, -1, -1).contiguous(),
                                           values.expand(len(chunk), -1, -1, -1).contiguous(), index)  # fmt: skip
                    options[cache_kwarg] = batch_cache
                run_until_stopped(lambda: model(input_ids=ids.to(device), **options))
                for i, r in enumerate(chunk):
                    own_states = seen["hidden"][i, : len(r) - len(shared)]
                    self._rows[_row_key(r)] = torch.cat([seen["start"], own_states]) if shared else own_states.clone()
                    self.held_bytes += len(r) * width

        with recording(self.layers, self.start, grab, self._note_output), torch.no_grad():
            for rows in groups:
                shared = _shared_start(rows) if len(rows) > 1 else 0
                if not shared:
                    run(rows, [])
                    continue
                cache = DynamicCache(config=config)
                ids = torch.tensor([rows[0][:shared]], device=device)
                run_until_stopped(lambda: model(input_ids=ids, use_cache=True, **{cache_kwarg: cache}))
                seen["start"] = seen["hidden"][0]
                run(rows, rows[0][:shared], cache)

    def _note_output(self, form: tuple[bool, int]) -> None:
        self._output = form

    @staticmethod
    def _row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[bytes, int]]:
        ids = input_ids.detach().cpu()
        lengths = (
            attention_mask.detach().cpu().sum(dim=1).tolist()
            if attention_mask is not None
            else [ids.shape[1]] * ids.shape[0]
        )
        return [(_row_key(ids[row, :length]), int(length)) for row, length in enumerate(lengths)]

    @contextmanager
    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Around one forward of ``input_ids`` (right-padded): record, or replay, layer ``start``'s input."""
        if self.start == 0 or self.max_bytes <= 0:
            yield
            return
        rows = self._row_keys(input_ids, attention_mask)
        if self._output is not None and all(key in self._rows for key, _ in rows):
            self.replays += 1

            def held(given: torch.Tensor) -> torch.Tensor:
                states = torch.zeros_like(given)
                for row, (key, size) in enumerate(rows):
                    states[row, :size] = self._rows[key]
                return states

            with replaying(self.layers, self.start, self._output, held):
                yield
            return

        def record(hidden: torch.Tensor) -> None:
            for row, (key, length) in enumerate(rows):
                size = length * hidden.shape[-1] * hidden.element_size()
                if key not in self._rows and self.held_bytes + size <= self.max_bytes:
                    self._rows[key] = hidden[row, :length].clone()
                    self.held_bytes += size

        with recording(self.layers, self.start, record, self._note_output):
            yield


class FrozenStarts:
    """Rows cut at one token each: the tokens before it run once, later forwards the rest.

    The v* optimisation adds a vector at each row's fact token in layer
    ``skip`` and runs the same rows at every step. Attention is causal, so
    the tokens before the fact token never see that vector, and no token's
    input to layer ``skip`` does. Here the tokens before each row's cut run
    once, with the model's attention cache kept, and :meth:`forward` runs
    only the tokens from the cut on, reading that cache. Its first forward
    of a row also holds what enters layer ``skip``; later forwards of held
    rows skip the layers before it. Results are a full forward's up to float
    reassociation (tested for every architecture family).

    Rows are cut at 0 (run whole) when the model's forward takes no
    attention cache or position ids, or when a row would not fit a sliding
    attention window; a model placed by accelerate (``hf_device_map``,
    whose hooks own each layer's forward) runs every layer.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[nn.Module], rows: Sequence[Sequence[int]],
        cuts: Sequence[int], pad_id: int, skip: int,
    ) -> None:  # fmt: skip
        from transformers import DynamicCache

        self.base = model.base_model
        self.layers = list(layers)
        self.skip = 0 if hasattr(model, "hf_device_map") else skip
        self.config = getattr(model, "config", None)
        self.cache_kwarg = cache_keyword(self.base)
        parameters = inspect.signature(self.base.forward).parameters
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        window = getattr(text, "sliding_window", None) or 0
        if "position_ids" not in parameters or self.cache_kwarg not in parameters or (
            window and max(map(len, rows)) + max(cuts) > window
        ):
            cuts = [0] * len(rows)
        self.cuts = list(cuts)
        device = next(model.parameters()).device
        start, rest = max(cuts), max(len(r) - c for r, c in zip(rows, cuts))
        head = torch.full((len(rows), start), pad_id, dtype=torch.long)
        self.ids = torch.full((len(rows), rest), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(rows), start + rest), dtype=torch.long)
        for row, (tokens, cut) in enumerate(zip(rows, cuts)):
            head[row, :cut] = torch.tensor(tokens[:cut], dtype=torch.long)
            self.ids[row, : len(tokens) - cut] = torch.tensor(tokens[cut:], dtype=torch.long)
            self.mask[row, :cut] = 1
            self.mask[row, start : start + len(tokens) - cut] = 1
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.lengths = torch.tensor([len(r) - c for r, c in zip(rows, cuts)])  # each row's own tokens
        self.positions = (torch.tensor(cuts)[:, None] + torch.arange(rest)).to(device)
        self.cached: list[tuple[torch.Tensor, torch.Tensor]] = []
        if start:  # pads after each row's own first tokens: only later (masked) positions see them
            cache = DynamicCache(config=self.config)
            with torch.no_grad():
                self.base(input_ids=head.to(device), use_cache=True, **{self.cache_kwarg: cache})
            self.cached = [(keys, values) for _, keys, values in _cache_layers(cache)]
        self.held: torch.Tensor | None = None
        self.is_held = torch.zeros(len(rows), dtype=torch.bool)
        self._output: tuple[bool, int] | None = None

    def forward(self, rows: Sequence[int]) -> torch.Tensor:
        """The last hidden states of ``rows`` from their cut on (right-padded to the
        longest of them)."""
        from transformers import DynamicCache

        rows = list(rows)
        index = torch.tensor(rows, device=self.ids.device)
        width = int(self.lengths[rows].max())
        start = self.mask.shape[1] - self.ids.shape[1]
        options: dict[str, Any] = {"attention_mask": self.mask[index, : start + width], "use_cache": bool(self.cached)}
        if self.cached:
            cache = DynamicCache(config=self.config)
            for layer, (keys, values) in enumerate(self.cached):
                cache.update(keys[index], values[index], layer)
            options[self.cache_kwarg] = cache
            options["position_ids"] = self.positions[index, :width]
        with self._skipping(rows, width):
            return self.base(input_ids=self.ids[index, :width], **options).last_hidden_state

    def _skipping(self, rows: list[int], width: int) -> Any:
        if self.skip == 0:
            return nullcontext()
        if self._output is not None and bool(self.is_held[rows].all()):
            return replaying(self.layers, self.skip, self._output, lambda given: self.held[rows, :width].to(given.dtype))

        def record(states: torch.Tensor) -> None:
            if self.held is None:
                self.held = states.new_zeros((len(self.is_held), self.ids.shape[1], states.shape[2]))
            self.held[rows, :width] = states
            self.is_held[rows] = True

        return recording(self.layers, self.skip, record, partial(setattr, self, "_output"))


@contextmanager
def recording(
    layers: Sequence[nn.Module], start: int, record: Callable[[torch.Tensor], None],
    note_form: Callable[[tuple[bool, int]], None],
) -> Iterator[None]:  # fmt: skip
    """``record(states)`` with what enters ``layers[start]``, and ``note_form`` with
    the form of the output of the layer before it, which a stand-in for a
    skipped layer returns (is a tuple, its length)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        record(_hidden_input(args, kwargs).detach())

    def note_output(module: nn.Module, args: tuple, output: Any) -> None:
        is_tensor = isinstance(output, torch.Tensor)
        note_form((not is_tensor, 1 if is_tensor else len(output)))

    with ExitStack() as stack:
        stack.callback(layers[start].register_forward_pre_hook(hook, with_kwargs=True).remove)
        stack.callback(layers[start - 1].register_forward_hook(note_output).remove)
        yield


@contextmanager
def replaying(
    layers: Sequence[nn.Module], start: int, output: tuple[bool, int],
    held: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[None]:  # fmt: skip
    """Layers before ``start`` run as identities and ``layers[start]`` gets
    ``held(given)`` instead of its input. ``output``: a skipped layer's output
    form (is a tuple, its length)."""
    is_tuple, length = output

    def skip(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states, *([None] * (length - 1))) if is_tuple else hidden_states

    def replay(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        states = held(_hidden_input(args, kwargs))
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    with ExitStack() as stack:
        for layer in layers[:start]:
            layer.forward = skip  # instance attribute: nn.Module.__call__ calls it instead
            stack.callback(delattr, layer, "forward")
        stack.callback(layers[start].register_forward_pre_hook(replay, with_kwargs=True).remove)
        yield


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes an attention cache: transformers
    5.24 renamed ``past_key_values`` to ``cache`` (the old name still works, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _row_key(tokens: Sequence[int] | torch.Tensor) -> bytes:
    """A held row's key: its token ids as int64 bytes."""
    return torch.as_tensor(tokens, dtype=torch.long).cpu().numpy().tobytes()


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer is called with (positional, or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _shared_start(rows: Sequence[Sequence[int]]) -> int:
    """How many first tokens all ``rows`` share, leaving each row at least one of its own."""
    if not rows:
        return 0
    shared = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        n = 0
        while n < shared and r[n] == first[n]:
            n += 1
        shared = n
    return max(shared, 0)


def _cache_layers(cache: Any) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(index, keys, values) of each filled layer of a transformers ``DynamicCache``."""
    return [(i, layer.keys, layer.values) for i, layer in enumerate(cache.layers)
            if getattr(layer, "keys", None) is not None and layer.keys.numel()]  # fmt: skip
