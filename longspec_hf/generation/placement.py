"""Where a target's layers run: one device, or several under accelerate's `device_map`.

`from_pretrained(..., device_map=...)` places whole decoder layers on devices and attaches accelerate
hooks that move each layer's inputs to its *execution* device (for layers offloaded to CPU RAM or disk
that is the device they are loaded onto at each forward, not where their weights rest). LongSpec keeps
each layer's K/V on the device its attention runs on.

A tensor-parallel target (transformers' `tp_plan`) runs every layer on each process of its group, each
with a block of the heads: [`head_sharding`] says how its key/value heads are split.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ----- tensor parallelism -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSharding:
    """How a tensor-parallel target (`from_pretrained(..., distributed_config=DistributedConfig(tp_size=...))`)
    splits its key/value heads: every process of `group` holds `local_heads` consecutive heads of the
    `num_heads`, in the group's rank order, and its attention sees only those."""

    group: "torch.distributed.ProcessGroup"
    local_heads: int
    num_heads: int

    def slowest(self, seconds: float, device: torch.device) -> float:
        """The largest of the group's processes' `seconds` (a collective), so that choices made from
        measured times agree on every process."""
        measured = torch.tensor([seconds], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(measured, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return float(measured)


def head_sharding(target: PreTrainedModel) -> HeadSharding | None:
    """The key/value head sharding of `target`'s decoder layers, None when their K/V projections are plain
    tensors. Raises a ValueError for a sharding LongSpec does not serve (anything but every layer's K/V
    projection split by output rows, i.e. by whole heads, evenly over one dimension of the device mesh)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    text_config = target.config.get_text_config()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    num_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    found = set()
    for layer in decoder.layers:
        for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            weight = projection.weight
            if not isinstance(weight, DTensor):
                found.add(None)
                continue
            placements = tuple(weight.placements)
            sharded = [dim for dim, placement in enumerate(placements) if not isinstance(placement, Replicate)]
            if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim != 0:
                raise ValueError(
                    f"The target's key/value projections are distributed as {placements} over a device mesh of shape "
                    f"{tuple(weight.device_mesh.shape)}; LongSpec serves tensor-parallel targets whose K/V projections "
                    "are split by heads (Shard(0), the 'colwise' plan of transformers' tp_plan) over one mesh dimension. "
                    "Load the target with transformers' default tp_plan, or without tensor parallelism."
                )
            local_rows = weight.to_local().shape[0]
            group = weight.device_mesh.get_group(sharded[0])
            if local_rows % head_dim or local_rows // head_dim * torch.distributed.get_world_size(group) != num_heads:
                raise ValueError(
                    f"The target's {num_heads} key/value heads are not split evenly by whole heads over its "
                    f"{torch.distributed.get_world_size(group)} tensor-parallel processes (this one holds {local_rows} "
                    f"rows of head dim {head_dim}). Use a tensor-parallel size that divides {num_heads}."
                )
            found.add(HeadSharding(group, local_rows // head_dim, num_heads))
    if len(found) > 1:
        raise ValueError(
            "The target's layers distribute their key/value projections differently (some sharded, some not, or over "
            "different process groups); LongSpec serves a target whose layers are all split alike or not at all."
        )
    return found.pop() if found else None
