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
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
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
    """The states at the last token of many prompts, with what they share run once
    and the layers an edit does not change skipped on later reads.

    Prompts come in groups that begin alike (one context prefix and one
    template, then a subject). :meth:`last_token_states` runs a group's shared
    start once, with the model's attention cache kept, and each prompt's own
    tokens on a copy of that cache. It also holds, per group, what enters
    decoder layer ``start`` (the shared start once, each prompt's own tokens):
    an edit of layers ``>= start`` leaves those unchanged, yet the edit loop
    reads the same prompts again for every edited layer and pass. A later read
    of a held group runs the layers before ``start`` as identities and gives
    layer ``start`` the held states. Layers before ``start`` must not change
    while the cache is used: it lives for one edit.

    At most ``max_bytes`` are held (a group that does not fit is not held);
    ``start`` 0, and a model placed by accelerate (``hf_device_map``, whose
    hooks own each layer's forward), hold nothing. Results are those of full
    forwards up to float reassociation (tested against full forwards for
    every architecture family).
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], start: int, max_bytes: int):
        self.layers = list(layers)
        self.start = start
        self.max_bytes = 0 if start == 0 or hasattr(model, "hf_device_map") else max_bytes
        self.held_bytes = 0
        self.replays = 0  # forwards that skipped the layers before ``start``
        self._starts: dict[bytes, torch.Tensor] = {}  # a shared start's tokens -> its states
        self._rows: dict[tuple[int, bytes], torch.Tensor] = {}  # (shared length, row) -> its own tokens' states
        self._output: tuple[bool, int] | None = None  # a skipped layer's output: (is a tuple, its length)

    def last_token_states(
        self,
        model: nn.Module,
        rows: Sequence[Sequence[int]],
        groups: Sequence[Hashable],
        sites: Mapping[str, tuple[nn.Module, bool]],
        pad_id: int,
        batch_rows: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each site's state at the last token of each row (rows × width, in order).

        ``sites``: name -> (module, its input if True else its output), in
        forward order; each forward stops after the last. Rows with the same
        ``groups`` key share their first tokens (as many as all of them
        have, each keeping one of its own). ``on_batch(rows)`` after each
        forward of at most ``batch_rows`` rows.
        """
        found: dict[str, list[torch.Tensor | None]] = {name: [None] * len(rows) for name in sites}
        members: dict[Hashable, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        with torch.no_grad():
            for indices in members.values():
                group_rows = [list(rows[i]) for i in indices]
                shared = _shared_start(group_rows) if len(group_rows) > 1 else 0
                self._run_group(model, group_rows, shared, sites, pad_id, batch_rows, on_batch,
                                lambda name, at, states: found[name].__setitem__(indices[at], states))  # fmt: skip
        return {name: torch.stack(values) for name, values in found.items()}  # type: ignore[arg-type]

    def _run_group(
        self, model: nn.Module, rows: list[list[int]], shared: int, sites: Mapping[str, tuple[nn.Module, bool]],
        pad_id: int, batch_rows: int, on_batch: Callable[[int], None] | None,
        found: Callable[[str, int, torch.Tensor], None],
    ) -> None:  # fmt: skip
        from transformers import DynamicCache

        from zupatch.engine.stats import pad_right  # stats reads keys with these hooks

        first = next(model.parameters())
        device, width = first.device, first.element_size() * model.get_input_embeddings().embedding_dim
        cache_kwarg, config = cache_keyword(model), getattr(model, "config", None)
        start_key = _row_key(rows[0][:shared])
        row_keys = [(shared, _row_key(r)) for r in rows]
        held = (not shared or start_key in self._starts) and all(k in self._rows for k in row_keys)
        size = (0 if start_key in self._starts else shared) + sum(len(r) - shared for r in rows)
        hold = not held and self.held_bytes + size * width <= self.max_bytes
        replay = held and self._output is not None and self.max_bytes > 0
        listening: dict[str, Any] = {"rows": None}
        stop = list(sites)[-1]

        def keep(name: str, states: torch.Tensor) -> None:
            if listening["rows"] is not None:
                chunk, lengths = listening["rows"]
                for at, length in zip(chunk, lengths):
                    found(name, at, states[at - chunk[0], length - 1].detach())

        def at_start(saved: Callable[[], torch.Tensor], save: Callable[[torch.Tensor], None]) -> Any:
            if replay:
                self.replays += 1
                return replaying(self.layers, self.start, self._output, lambda given: saved().to(given.dtype))  # type: ignore[arg-type]
            if hold:
                return recording(self.layers, self.start, save, partial(setattr, self, "_output"))
            return nullcontext()

        inputs = {name: module for name, (module, is_input) in sites.items() if is_input}
        outputs = {name: module for name, (module, is_input) in sites.items() if not is_input}
        with (
            on_inputs(inputs, keep, stop_at=stop if stop in inputs else None),
            on_outputs(outputs, keep, stop_at=stop if stop in outputs else None),
        ):
            cache = None
            if shared:
                cache = DynamicCache(config=config)
                ids = torch.tensor([rows[0][:shared]], device=device)

                def save_start(states: torch.Tensor) -> None:
                    if start_key not in self._starts:
                        self._starts[start_key] = states[0].clone()
                        self.held_bytes += shared * width

                with at_start(lambda: self._starts[start_key][None], save_start):
                    run_until_stopped(partial(model, input_ids=ids, use_cache=True, **{cache_kwarg: cache}))
            for begin in range(0, len(rows), batch_rows):
                chunk = list(range(begin, min(begin + batch_rows, len(rows))))
                own = [rows[at][shared:] for at in chunk]
                ids, mask = pad_right(own, pad_id, device)
                options: dict[str, Any] = {"use_cache": cache is not None}
                if cache is not None:
                    options[cache_kwarg] = _expanded(cache, len(chunk), config, self.start if replay else 0)
                    mask = torch.cat([mask.new_ones((len(chunk), shared)), mask], dim=1)

                def saved_rows() -> torch.Tensor:
                    some = self._rows[row_keys[chunk[0]]]
                    states = some.new_zeros((len(chunk), ids.shape[1], some.shape[-1]))
                    for place, at in enumerate(chunk):
                        states[place, : len(own[place])] = self._rows[row_keys[at]]
                    return states

                def save_rows(states: torch.Tensor) -> None:
                    for place, at in enumerate(chunk):
                        if row_keys[at] not in self._rows:
                            self._rows[row_keys[at]] = states[place, : len(own[place])].clone()
                            self.held_bytes += len(own[place]) * width

                listening["rows"] = (chunk, [len(o) for o in own])
                with at_start(saved_rows, save_rows):
                    run_until_stopped(partial(model, input_ids=ids, attention_mask=mask, **options))
                listening["rows"] = None
                if on_batch is not None:
                    on_batch(len(chunk))


def _expanded(cache: Any, rows: int, config: Any, skipped: int) -> Any:
    """A new attention cache holding ``cache`` (one row) for each of ``rows`` rows.

    Layers before ``skipped`` ran as stand-ins, which read nothing from the
    cache and wrote nothing to it; positions and masks still read their
    length, so they get placeholders of that length.
    """
    from transformers import DynamicCache

    filled = _cache_layers(cache)
    length = filled[0][1].shape[-2]
    expanded = DynamicCache(config=config)
    held = {index for index, _, _ in filled}
    for index in range(skipped):
        if index not in held:
            placeholder = filled[0][1].new_zeros((rows, 1, length, 1))
            expanded.update(placeholder, placeholder, index)
    for index, keys, values in filled:
        expanded.update(keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous(), index)
    return expanded


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
