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

from collections.abc import Callable, Iterator, Mapping
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
