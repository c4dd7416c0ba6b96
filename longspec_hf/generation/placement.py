"""Where a target's layers run: one device, or several under accelerate's `device_map`.

`from_pretrained(..., device_map=...)` places whole decoder layers on devices and attaches accelerate
hooks that move each layer's inputs to its *execution* device (for layers offloaded to CPU RAM or disk
that is the device they are loaded onto at each forward, not where their weights rest). LongSpec keeps
each layer's K/V on the device its attention runs on.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def execution_device(module: nn.Module, ancestors: tuple[nn.Module, ...] = ()) -> torch.device | None:
    """The device `module` computes on: its accelerate hook's execution device (the module's own, or
    the nearest ancestor's), else the device of its first parameter; None when it has no parameters."""
    for owner in (module, *reversed(ancestors)):
        device = _hook_device(getattr(owner, "_hf_hook", None))
        if device is not None:
            return device
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def _hook_device(hook) -> torch.device | None:
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", ()):  # accelerate's SequentialHook
        device = _hook_device(inner)
        if device is not None:
            return device
    device = getattr(hook, "execution_device", None)
    if device is None or isinstance(device, dict):
        return None
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def input_device(target: PreTrainedModel) -> torch.device:
    """The device the target's input embedding computes on (where its inputs and LongSpec's buffers live)."""
    embedding = target.get_input_embeddings()
    device = execution_device(embedding, (target,))
    return _normalized(device) if device is not None else embedding.weight.device


def layer_devices(target: PreTrainedModel, default: torch.device) -> list[torch.device]:
    """The execution device of each of `target`'s decoder layers (`default` for a layer without one)."""
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    ancestors = (target, decoder) if decoder is not target else (target,)
    devices = []
    for layer in decoder.layers:
        device = execution_device(layer, ancestors)
        devices.append(_normalized(device) if device is not None else default)
    return devices


def output_device(target: PreTrainedModel, default: torch.device) -> torch.device:
    """The device the target's LM head computes on."""
    head = target.get_output_embeddings()
    device = execution_device(head, (target,)) if head is not None else None
    return _normalized(device) if device is not None else default


def _normalized(device: torch.device) -> torch.device:
    """`cuda` and `cuda:0` name one device; compare them as the same."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(first: torch.device, second: torch.device) -> bool:
    return _normalized(first) == _normalized(second)


def on_one_device(target: PreTrainedModel, device: torch.device) -> bool:
    """Whether every decoder layer and the LM head of `target` run on `device`."""
    devices = [*layer_devices(target, device), output_device(target, device)]
    return all(same_device(other, device) for other in devices)
