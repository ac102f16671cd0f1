"""Data parallelism, applied from outside the model (torchtitan's `parallelize.py`).

    torchrun --nproc_per_node=N -m kiln pretrain RECIPE --train.parallel {ddp,fsdp,deepspeed}

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) and starts
the process group: NCCL on CUDA, gloo on CPU. `parallelize` wraps the model:

- ddp:  `DistributedDataParallel`; every rank holds the full weights, gradients are all-reduced
        (averaged) in buckets during backward.
- fsdp: FSDP2 `fully_shard` on every transformer block, then on the root (embedding, final norm and
        the tied head). Parameters, gradients and optimizer state are sharded over the ranks. With bf16
        precision the MixedPrecisionPolicy gathers parameters in bf16 and reduce-scatters gradients in
        fp32 (torch.autocast is then off: the policy is the mixed precision). Optional CPU offload.
- deepspeed: DeepSpeed ZeRO stage 1/2/3. `parallelize` leaves the model alone; kiln/train/zero.py wraps
        model and optimizer together in the engine, which then owns accumulation, clipping, bf16 and the
        sharded checkpoint state (autocast is off: DeepSpeed's bf16 mode is the mixed precision).

Gradient accumulation: `grad_sync(model, False)` around every micro-batch but the last, so only the
last backward communicates (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`; DeepSpeed's engine counts
micro-batches itself).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import ConfigError
from kiln.runtime.device import pick_device


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. `parallel == "none"` is the one-process, no-process-group case."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that prints, logs metrics, writes reports and single-file checkpoints."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.parallel != "none"


def init_distributed(parallel: str, device_spec: str, cpu_offload: bool = False) -> tuple[Dist, torch.device]:
    """Start the process group from torchrun's environment; returns (Dist, this rank's device).

    `parallel` other than none without torchrun runs a one-process group (FSDP2 on one GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world > 1:
            raise ConfigError(f"train.parallel=none but torchrun started {world} processes: set "
                              "--train.parallel ddp, fsdp or deepspeed")
        return Dist(), pick_device(device_spec)
    if not dist.is_available():
        raise ConfigError(f"train.parallel={parallel} needs torch.distributed, which this PyTorch build lacks")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever train.device named
        torch.cuda.set_device(device)
    if parallel == "deepspeed":
        from kiln.train import zero
        zero.select_accelerator(device)
        zero.require()
    if "MASTER_ADDR" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")   # DeepSpeed reads LOCAL_RANK
    if not dist.is_initialized():
        # CPU offload reduces the (CPU) gradient norm across ranks, which NCCL cannot do: gloo for CPU tensors.
        backend = ("cpu:gloo,cuda:nccl" if cpu_offload else "nccl") if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(parallel, dist.get_rank(), dist.get_world_size(), local_rank), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, d: Dist, device: torch.device, bf16: bool, cpu_offload: bool = False) -> nn.Module:
    """The model to train: `model` itself (none; deepspeed, whose engine zero.initialize builds around model
    and optimizer), a DDP wrapper (ddp) or `model`, sharded in place (fsdp).

    Build the optimizer afterwards from `model` (FSDP2 replaces parameters with sharded DTensors;
    DDP shares the parameters of `model`, whose names carry no `module.` prefix)."""
    if d.parallel in ("none", "deepspeed"):
        return model
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    mesh = init_device_mesh(device.type, (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    # The root group holds the embedding, the final norm and the head (one tensor when tied).
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    if cpu_offload and device.type == "cuda":
        # FSDP manages parameters only; the RoPE tables must sit beside the activations.
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(device)
    return model


def uses_autocast(d: Dist) -> bool:
    """FSDP2's MixedPrecisionPolicy and DeepSpeed's bf16 mode cast parameters themselves; autocast on top
    would only add casts."""
    return d.parallel not in ("fsdp", "deepspeed")


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside with enabled=False, backward accumulates local gradients without communicating."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = getattr(model, "_orig_mod", model)   # inside torch.compile's wrapper
    if enabled:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper or a DeepSpeed engine (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded norm) as the plain global tensor; a plain tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sum_over_ranks(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `t` over ranks (a collective: every rank must call it at the same point); no host sync."""
    if d.world_size == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (a collective and a host sync: call it rarely)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
