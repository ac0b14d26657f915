"""Processes and devices: the process group a launcher describes, each rank's device, and how the
model is replicated (DDP) or sharded (FSDP2) over the ranks.

Under `torchrun` or `accelerate launch` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) training
is data-parallel: torch DDP (NCCL on GPUs, gloo on CPU), or FSDP2 with `parallel="fsdp"`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """In place over every rank (a no-op alone); returns `t`."""
        if self.enabled:
            dist.all_reduce(t, op=op)
        return t


def device_kind(setting: str) -> str:
    """ "auto" -> cuda when available, else cpu; anything else as given."""
    return setting if setting != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(device_type: str) -> Dist:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(setting: str, d: Dist) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) under cuda."""
    kind = device_kind(setting)
    if kind == "cuda":
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device(kind)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast, or None for plain fp32; "auto" takes bf16 on GPUs that support it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def wrap(model: nn.Module, d: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """The module the forward runs through: `model` sharded in place (FSDP2), DDP around it, or itself."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # one FSDP unit per decoder layer (gathered just in time), the rest (embeddings, head, query
        # vector) in the root unit
        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module)
        fully_shard(model)
        return model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def full_state_dict(model: nn.Module, fsdp: bool, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
    """FSDP: the gathered weights (a collective: every rank calls it), on rank 0 only unless all_ranks.
    Otherwise None: the module's own state_dict is already whole."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    )


def trainable_state_dict(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The parameters that train, whole and on the CPU (FSDP: gathered, a collective every rank calls)."""
    if not fsdp:
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}  # buffers are not part of it
