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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
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
    forwards for every architecture family).
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], start: int, max_bytes: int):
        self.layers = list(layers)
        self.start = start
        self.max_bytes = max_bytes if not hasattr(model, "hf_device_map") else 0
        self.held_bytes = 0
        self.replays = 0
        self._rows: dict[bytes, torch.Tensor] = {}
        self._output: tuple[bool, int] | None = None  # a skipped layer's output: (is a tuple, its length)

    @staticmethod
    def _row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[bytes, int]]:
        ids = input_ids.detach().cpu()
        lengths = (
            attention_mask.detach().cpu().sum(dim=1).tolist()
            if attention_mask is not None
            else [ids.shape[1]] * ids.shape[0]
        )
        return [(ids[row, :length].numpy().tobytes(), int(length)) for row, length in enumerate(lengths)]

    @contextmanager
    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Around one forward of ``input_ids`` (right-padded): record, or replay, layer ``start``'s input."""
        if self.start == 0 or self.max_bytes <= 0:
            yield
            return
        rows = self._row_keys(input_ids, attention_mask)
        target = self.layers[self.start]
        replay_all = self._output is not None and all(key in self._rows for key, _ in rows)
        with ExitStack() as stack:
            if not replay_all:

                def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
                    hidden = (args[0] if args else kwargs["hidden_states"]).detach()
                    for row, (key, length) in enumerate(rows):
                        size = length * hidden.shape[-1] * hidden.element_size()
                        if key not in self._rows and self.held_bytes + size <= self.max_bytes:
                            self._rows[key] = hidden[row, :length].clone()
                            self.held_bytes += size

                def shape_of(module: nn.Module, args: tuple, output: Any) -> None:
                    is_tensor = isinstance(output, torch.Tensor)
                    self._output = (not is_tensor, 1 if is_tensor else len(output))

                stack.callback(target.register_forward_pre_hook(record, with_kwargs=True).remove)
                stack.callback(self.layers[self.start - 1].register_forward_hook(shape_of).remove)
            else:
                self.replays += 1
                is_tuple, length = self._output  # type: ignore[misc]

                def skip(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                    return (hidden_states, *([None] * (length - 1))) if is_tuple else hidden_states

                def replay(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                    given = args[0] if args else kwargs["hidden_states"]
                    held = torch.zeros_like(given)
                    for row, (key, size) in enumerate(rows):
                        held[row, :size] = self._rows[key]
                    if args:
                        return (held, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": held}

                for layer in self.layers[: self.start]:
                    layer.forward = skip  # instance attribute: nn.Module.__call__ calls it instead
                    stack.callback(delattr, layer, "forward")
                stack.callback(target.register_forward_pre_hook(replay, with_kwargs=True).remove)
            yield
