"""Where a model's layers go when it does not fit on one device: a device map.

``--device-map auto`` hands the placement to accelerate's big-model loading
(``from_pretrained(..., device_map=...)``): the layers are spread over the
GPUs present and then CPU RAM, each layer runs where its weights are, and
accelerate's hooks move the hidden states between devices. ``--max-memory``
caps what each device may hold (``0=70GiB,1=75GiB,cpu=200GiB``). The
edited layers' down projections must hold their weights on a device
(a GPU or CPU RAM): the edit is written into them. Layers that accelerate
offloads (to CPU RAM when GPUs run them, or to disk) are read where they
are, never written. docs/create.md, "Devices and dtypes".
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from zupatch.errors import ZupatchError

#: accelerate's placement strategies, as ``from_pretrained`` takes them.
DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")

_AMOUNT = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)$", re.IGNORECASE)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=70GiB,cpu=120GiB"`` → ``{0: "70GiB", "cpu": "120GiB"}`` (GPU indices as ints)."""
    limits: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        device, sep, amount = (s.strip() for s in part.partition("="))
        if not sep or not device or not amount:
            raise ZupatchError(f"max memory {part!r} is not DEVICE=AMOUNT (e.g. 0=70GiB or cpu=120GiB)")
        if not _AMOUNT.match(amount):
            raise ZupatchError(f"max memory for {device!r}: {amount!r} is not an amount like 70GiB or 500MB")
        if device.isdigit():
            key: int | str = int(device)
        elif device in ("cpu", "mps"):
            key = device
        else:
            raise ZupatchError(f"max memory: unknown device {device!r}; use a GPU index (0, 1, ...), cpu or mps")
        if key in limits:
            raise ZupatchError(f"max memory: device {device!r} given twice")
        limits[key] = amount.replace(" ", "")
    return limits


def placement_problem(device_map: str | None, max_memory: str | None) -> str | None:
    """Why these settings cannot be used, or None."""
    if device_map is not None and device_map not in DEVICE_MAPS:
        return f"unknown device map {device_map!r}; choose {', '.join(DEVICE_MAPS)}"
    if max_memory is not None:
        if device_map is None:
            return "max memory applies to a device map: give device_map (--device-map auto) too"
        try:
            parse_max_memory(max_memory)
        except ZupatchError as exc:
            return exc.message
    return None


def device_map_options(device_map: str | None, max_memory: str | None) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` (none without a device map)."""
    if device_map is None:
        return {}
    if importlib.util.find_spec("accelerate") is None:
        raise ZupatchError("a device map needs accelerate: pip install accelerate")
    options: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        options["max_memory"] = parse_max_memory(max_memory)
    return options


def dispatched(model: nn.Module) -> bool:
    """Whether accelerate's hooks run the model's layers (a device map over several
    devices, or with offloads): then they own each layer's forward, and zupatch
    runs whole forwards. A map that put everything on one device adds no hooks."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this module's weights off any device (meta tensors)."""
    return any(p.device.type == "meta" for p in module.parameters())


@contextmanager
def readable(model: nn.Module, name: str, parameter: torch.Tensor) -> Iterator[torch.Tensor]:
    """The parameter ``name`` of ``model`` with its values: itself, or, when a
    device map offloaded it (a meta tensor), its weights brought to the CPU for
    the duration (accelerate's ``align_module_device``), e.g. to hash them."""
    if parameter.device.type != "meta":
        yield parameter
        return
    from accelerate.utils import align_module_device

    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    with align_module_device(owner, torch.device("cpu")):
        yield getattr(owner, attribute)


def layers_per_device(model: nn.Module, layers: Sequence[nn.Module]) -> dict[str, int] | None:
    """How many of ``layers`` (the decoder layers) a device map put on each device
    (``"0"``, ``"cpu"``, ``"disk"``...), or None for a model loaded without one."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    counts: dict[str, int] = {}
    for layer in layers:
        name = names[id(layer)]
        owner = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
        where = "?" if owner is None else str(device_map[owner])
        counts[where] = counts.get(where, 0) + 1
    return counts


def require_written_on_device(name: str, parameter: torch.Tensor, changed_by: str, where: str | None = None) -> None:
    """Refuse, in one line (naming ``where``), to write into ``name`` when a device map
    offloaded it (a meta tensor, where a write would be lost); ``changed_by`` says what writes it."""
    if parameter.device.type == "meta":
        raise ZupatchError(f"the device map offloaded {name}, which {changed_by} changes: give the devices more "
                           "room (--max-memory) so that it sits on a GPU or in CPU RAM", where)  # fmt: skip


def require_editable(modules: Sequence[tuple[int, nn.Module]]) -> None:
    """Refuse, in one line, an edit of down projections whose weights are offloaded."""
    away = [layer for layer, module in modules if offloaded(module)]
    if away:
        raise ZupatchError(
            f"the device map offloaded the down projection of layer(s) {', '.join(map(str, away))}, which the "
            "edit writes: give the devices more room (--max-memory) so that they sit on a GPU or in CPU RAM"
        )


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the first parameter's device or, when a device map
    offloads the first layers (meta tensors), the first device that holds
    weights; the CPU when none does (accelerate's hooks move inputs on)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
