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
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from zupatch.engine.placement import dispatched, model_device

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
    template, then a subject). :meth:`last_token_states` runs blocks of
    groups in two forwards: the distinct shared starts, with the model's
    attention cache kept, then every prompt's own tokens (often one or two),
    each reading its group's start from that cache (position ids given, the
    other starts masked). It also holds what enters decoder layer ``start``
    (each shared start once, each prompt's own tokens): an edit of layers
    ``>= start`` leaves those unchanged, yet the edit loop reads the same
    prompts again for every edited layer and pass. A later read of a held
    block runs the layers before ``start`` as identities and gives layer
    ``start`` the held states. Layers before ``start`` must not change while
    the cache is used: it lives for one edit.

    At most ``max_bytes`` are held (a block that does not fit is not held);
    ``start`` 0, and a model whose layers accelerate's hooks run (a device map
    over several devices, :func:`~zupatch.engine.placement.dispatched`), hold nothing. A model whose forward
    takes no position ids, or whose sliding window is too short for the
    padded rows, runs every prompt whole. Results are those of full forwards
    up to float reassociation (tested against one-prompt forwards for every
    architecture family).
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], start: int, max_bytes: int):
        self.layers = list(layers)
        self.start = start
        self.max_bytes = 0 if start == 0 or dispatched(model) else max_bytes
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
        have, each keeping one of its own). Groups run shortest first, in
        blocks of at most ``batch_rows`` rows: one forward of the block's
        shared starts, one of its rows' own tokens; ``on_batch(rows)`` after
        each block.
        """
        found: dict[str, list[torch.Tensor | None]] = {name: [None] * len(rows) for name in sites}
        members: dict[Hashable, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        window = _sliding_window(model)  # a start and own tokens, each padded, must fit in it
        sharing = _takes_positions(model) and not (window and 2 * max(map(len, rows), default=0) > window)
        block: list[tuple[list[int], int]] = []  # (row indices, shared length) per group

        def run_block() -> None:
            self._run_block(model, rows, block, sites, pad_id, found)
            if on_batch is not None:
                on_batch(sum(len(part) for part, _ in block))

        # A forward pads every row to its block's longest own part, so groups run shortest
        # first, and rows that share no start (nothing to run twice) by their own length:
        # a block of templates that begin with the subject took twice as long padded.
        units: list[tuple[int, list[int], int]] = []  # (longest own part, rows, shared start)
        for indices in members.values():
            shared = _shared_start([rows[i] for i in indices]) if sharing and len(indices) > 1 else 0
            if shared:
                units.append((max(len(rows[i]) for i in indices) - shared, indices, shared))
                continue
            by_length: dict[int, list[int]] = {}
            for i in indices:
                by_length.setdefault(len(rows[i]), []).append(i)
            units += [(length, part, 0) for length, part in by_length.items()]
        units.sort(key=lambda unit: unit[0])
        with torch.no_grad():
            for _, indices, shared in units:
                for begin in range(0, len(indices), batch_rows):
                    part = indices[begin : begin + batch_rows]
                    if block and sum(len(p) for p, _ in block) + len(part) > batch_rows:
                        run_block()
                        block = []
                    block.append((part, shared))
            if block:
                run_block()
        return {name: torch.stack(values) for name, values in found.items()}  # type: ignore[arg-type]

    def _run_block(
        self, model: nn.Module, rows: Sequence[Sequence[int]], block: list[tuple[list[int], int]],
        sites: Mapping[str, tuple[nn.Module, bool]], pad_id: int, found: dict[str, list[torch.Tensor | None]],
    ) -> None:  # fmt: skip
        """Two forwards: the block's distinct shared starts, then every row's own tokens
        on its group's attention cache (positions given, the other starts masked)."""
        from transformers import DynamicCache

        from zupatch.engine.stats import pad_right  # stats reads its keys with this module's hooks

        first = next(model.parameters())
        device, width = first.device, first.element_size() * model.get_input_embeddings().embedding_dim
        cache_kwarg, config = cache_keyword(model), getattr(model, "config", None)
        order = [i for part, _ in block for i in part]
        cuts = [shared for part, shared in block for _ in part]
        own = [list(rows[i][cut:]) for i, cut in zip(order, cuts)]
        lengths = [len(tokens) for tokens in own]
        starts = list(dict.fromkeys(tuple(rows[part[0]][:shared]) for part, shared in block if shared))
        start_keys = [_row_key(tokens) for tokens in starts]
        row_keys = [(cut, _row_key(rows[i])) for i, cut in zip(order, cuts)]
        new_bytes = width * (
            sum(len(t) for t, k in zip(starts, start_keys) if k not in self._starts)
            + sum(n for n, k in zip(lengths, row_keys) if k not in self._rows)
        )
        held = all(k in self._starts for k in start_keys) and all(k in self._rows for k in row_keys)
        replay = held and self._output is not None and self.max_bytes > 0
        hold = not held and self.max_bytes > 0 and self.held_bytes + new_bytes <= self.max_bytes

        def at_start(keys: list[Any], store: dict, sizes: list[int], width_now: int) -> Any:
            """Around one forward: replay the held states entering layer ``start``, or hold them."""
            if replay:
                self.replays += 1

                def held_states(given: torch.Tensor) -> torch.Tensor:
                    states = given.new_zeros((len(keys), width_now, given.shape[-1]))
                    for place, key in enumerate(keys):
                        states[place, : sizes[place]] = store[key]
                    return states

                return replaying(self.layers, self.start, self._output, held_states)  # type: ignore[arg-type]
            if hold:

                def keep_states(states: torch.Tensor) -> None:
                    for place, (key, size) in enumerate(zip(keys, sizes)):
                        if key not in store:
                            store[key] = states[place, :size].clone()
                            self.held_bytes += size * width

                return recording(self.layers, self.start, keep_states, partial(setattr, self, "_output"))
            return nullcontext()

        listening = [False]

        def keep(name: str, states: torch.Tensor) -> None:
            if listening[0]:
                ends = torch.tensor(lengths, device=states.device) - 1
                last = states[torch.arange(len(order), device=states.device), ends]
                for place, i in enumerate(order):
                    found[name][i] = last[place]  # rows of one small tensor, not views of the whole forward

        inputs = {name: module for name, (module, is_input) in sites.items() if is_input}
        outputs = {name: module for name, (module, is_input) in sites.items() if not is_input}
        stop = list(sites)[-1]
        ids, mask = pad_right(own, pad_id, device)
        longest = ids.shape[1]
        options: dict[str, Any] = {}
        with (
            on_inputs(inputs, keep, stop_at=stop if stop in inputs else None),
            on_outputs(outputs, keep, stop_at=stop if stop in outputs else None),
        ):
            if starts:
                cache = DynamicCache(config=config)
                start_ids, _ = pad_right(starts, pad_id, device)  # pads after each start: never attended to
                with at_start(start_keys, self._starts, [len(t) for t in starts], start_ids.shape[1]):
                    run_until_stopped(partial(model, input_ids=start_ids, use_cache=True, **{cache_kwarg: cache}))
                place_of = {tokens: place for place, tokens in enumerate(starts)}
                which = [place_of.get(tuple(rows[i][:cut]), 0) for i, cut in zip(order, cuts)]  # 0: masked
                options[cache_kwarg] = _gathered(cache, torch.tensor(which, device=device), config,
                                                 self.start if replay else 0)  # fmt: skip
                head = torch.zeros((len(own), start_ids.shape[1]), dtype=torch.long, device=device)
                for place, cut in enumerate(cuts):
                    head[place, :cut] = 1
                mask = torch.cat([head, mask], dim=1)
                options["position_ids"] = (torch.tensor(cuts)[:, None] + torch.arange(longest)).to(device)
                options["use_cache"] = True
            listening[0] = True
            with at_start(row_keys, self._rows, lengths, longest):
                run_until_stopped(partial(model, input_ids=ids, attention_mask=mask, **options))
            listening[0] = False


def _takes_positions(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes an attention cache and position ids, so that
    rows can run on a cache of starts they do not share."""
    parameters = inspect.signature(model.forward).parameters
    return "position_ids" in parameters and cache_keyword(model) in parameters


def _sliding_window(model: nn.Module) -> int:
    """The model's sliding attention window in tokens, 0 when it has none."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "sliding_window", None) or 0)


def _gathered(cache: Any, which: torch.Tensor, config: Any, skipped: int) -> Any:
    """A new attention cache whose row ``i`` is row ``which[i]`` of ``cache``.

    Layers before ``skipped`` ran as stand-ins, which read nothing from the
    cache and wrote nothing to it; positions and masks still read their
    length, so they get placeholders of that length.
    """
    from transformers import DynamicCache

    filled = _cache_layers(cache)
    length = filled[0][1].shape[-2]
    gathered = DynamicCache(config=config)
    held = {index for index, _, _ in filled}
    for index in range(skipped):
        if index not in held:
            placeholder = filled[0][1].new_zeros((len(which), 1, length, 1))
            gathered.update(placeholder, placeholder, index)
    for index, keys, values in filled:
        gathered.update(keys[which], values[which], index)
    return gathered


#: What one more forward costs, in padded tokens (row × position) run: :func:`by_width`.
_FORWARD_COST_TOKENS = 128


def by_width(requests: list[int], width: dict[int, int], rows: dict[int, int]) -> list[list[int]]:
    """``requests`` in groups that each run as one right-padded forward, chosen to
    minimise the padded tokens run plus :data:`_FORWARD_COST_TOKENS` per forward
    (rows are padded to the longest of their forward: one long prompt would
    make every row as long)."""
    order = sorted(requests, key=lambda i: width[i])
    best = [0.0] + [math.inf] * len(order)  # best[j]: cost of order[:j]
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        count = 0
        for i in range(j, 0, -1):  # order[i-1 : j] as one forward, padded to order[j-1]'s width
            count += rows[order[i - 1]]
            cost = best[i - 1] + _FORWARD_COST_TOKENS + count * width[order[j - 1]]
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    parts, j = [], len(order)
    while j:
        parts.append(order[cut[j] : j])
        j = cut[j]
    return parts[::-1]


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
    attention window; a model whose layers accelerate's hooks run (a device
    map over several devices) runs every layer.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[nn.Module], rows: Sequence[Sequence[int]],
        cuts: Sequence[int], pad_id: int, skip: int,
    ) -> None:  # fmt: skip
        self.base = model.base_model
        self.layers = list(layers)
        self.skip = 0 if dispatched(model) else skip
        self.config = getattr(model, "config", None)
        self.cache_kwarg = cache_keyword(self.base)
        window = _sliding_window(model)
        if not _takes_positions(self.base) or (window and max(map(len, rows)) + max(cuts) > window):
            cuts = [0] * len(rows)
        self.cuts = list(cuts)
        device = model_device(model)
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
        self.cache: Any = None
        if start:  # pads after each row's own first tokens: only later (masked) positions see them
            self.cache = self._run_starts(head.to(device))
        self.held: torch.Tensor | None = None
        self.is_held = torch.zeros(len(rows), dtype=torch.bool)
        self._output: tuple[bool, int] | None = None

    def _run_starts(self, head: torch.Tensor) -> Any:
        """The attention cache of every row's start (``head``: row ``r``'s first
        ``self.cuts[r]`` tokens, right-padded), run in a few forwards of starts of
        about the same length (:func:`by_width`) and joined, zeros where a row's
        forward was shorter."""
        from transformers import DynamicCache

        cuts, start = self.cuts, head.shape[1]
        rows = list(range(len(cuts)))
        parts = by_width(rows, dict(enumerate(cuts)), dict.fromkeys(rows, 1))
        per_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for part in parts:
            cache = DynamicCache(config=self.config)
            length = max(1, max(cuts[r] for r in part))  # rows cut at 0: one masked pad
            with torch.no_grad():
                self.base(input_ids=head[part, :length], use_cache=True, **{self.cache_kwarg: cache})
            for index, keys, values in _cache_layers(cache):
                pad = (0, 0, 0, start - keys.shape[-2])
                per_layer.setdefault(index, []).append((F.pad(keys, pad), F.pad(values, pad)))
        back = torch.argsort(torch.tensor([r for part in parts for r in part])).to(head.device)
        joined = DynamicCache(config=self.config)
        for index, pieces in sorted(per_layer.items()):
            keys = torch.cat([k for k, _ in pieces])[back]
            values = torch.cat([v for _, v in pieces])[back]
            joined.update(keys, values, index)
        return joined

    def forward(
        self, rows: Sequence[int], edit_input: tuple[int, Callable[[torch.Tensor], torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """The last hidden states of ``rows`` from their cut on (right-padded to the
        longest of them). ``edit_input = (index, edit)``: decoder layer ``index``
        (at least ``skip``) reads ``edit(states)`` instead of its input ``states``,
        the held one included."""
        rows = list(rows)
        index = torch.tensor(rows, device=self.ids.device)
        width = int(self.lengths[rows].max())
        start = self.mask.shape[1] - self.ids.shape[1]
        options: dict[str, Any] = {"attention_mask": self.mask[index, : start + width]}
        options["use_cache"] = self.cache is not None
        if self.cache is not None:
            options[self.cache_kwarg] = _gathered(self.cache, index, self.config, 0)
            options["position_ids"] = self.positions[index, :width]
        with ExitStack() as stack:
            stack.enter_context(self._skipping(rows, width))
            if edit_input is not None:  # after the replay's or the recording's hook on that layer
                at, edit = edit_input
                if at < self.skip:
                    raise ValueError(f"cannot edit the input of layer {at}: layers before {self.skip} are held")
                stack.callback(self.layers[at].register_forward_pre_hook(_editing(edit), with_kwargs=True).remove)
            return self.base(input_ids=self.ids[index, :width], **options).last_hidden_state

    def _skipping(self, rows: list[int], width: int) -> Any:
        if self.skip == 0:
            return nullcontext()
        if self._output is not None and bool(self.is_held[rows].all()):
            held = self.held
            return replaying(self.layers, self.skip, self._output, lambda given: held[rows, :width].to(given.dtype))

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

    with ExitStack() as stack:
        for layer in layers[:start]:
            layer.forward = skip  # instance attribute: nn.Module.__call__ calls it instead
            stack.callback(delattr, layer, "forward")
        stack.callback(layers[start].register_forward_pre_hook(_editing(held), with_kwargs=True).remove)
        yield


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes an attention cache: transformers
    5.24 renamed ``past_key_values`` to ``cache`` (the old name still works, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _row_key(tokens: Sequence[int] | torch.Tensor) -> bytes:
    """A held row's key: its token ids as int64 bytes."""
    return torch.as_tensor(tokens, dtype=torch.long).cpu().numpy().tobytes()


def _editing(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., tuple[tuple, dict]]:
    """A forward pre-hook (``with_kwargs``) that gives the layer ``edit(states)`` as its hidden input."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        states = edit(_hidden_input(args, kwargs))
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    return hook


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
