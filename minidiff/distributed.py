"""Training on several processes with PyTorch's own engine: ``torchrun`` and DistributedDataParallel.

``train.train`` runs unchanged under ``torchrun --nproc_per_node=N``; this module holds what it needs
(README, "Training on several GPUs"; chapter 1 §4 for the loop itself):

- **Who am I.** :func:`world` gives (rank, world size) of the process group, (0, 1) without one.
  :func:`init_from_env` starts the group that ``torchrun`` describes in the environment, with NCCL on
  GPUs and gloo on CPUs.
- **The data split.** Every process draws the same *global* batch of W x B examples from the shared
  data generator (the same seed on every rank), and takes its own block of B
  (:func:`split_blocks`), as PyTorch's DistributedSampler does with an index list.
- **The noise, keyed by example block.** The t, eps, u ... of a block come from a generator seeded by
  (seed, step, block) (:func:`keyed_generator`): they depend on which examples a block holds, not on
  the rank that computes it. W processes with batch B each therefore compute what one process
  computes with batch W x B split into W blocks (``train(..., shards=W)``, gradient accumulation):
  the same examples, the same noise draws, the same mean gradient.
- **The gradient.** The loss is computed inside DistributedDataParallel's forward
  (:class:`LossModule`): a loss may call any method of its network (``net.encode``, ``net.code``),
  and DDP still sees one forward per step and averages the gradients in its backward. No
  hand-written all-reduce of gradients.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "LossModule",
    "accumulate",
    "all_gather_objects",
    "barrier",
    "broadcast_module",
    "init_from_env",
    "keyed_generator",
    "mean_over_ranks",
    "split_blocks",
    "world",
    "wrap",
]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | None = None) -> tuple[int, int, torch.device]:
    """Start the process group ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, ...), once.

    Backend: NCCL when CUDA is available (each process on GPU ``LOCAL_RANK``), gloo on CPUs. Without
    torchrun's variables nothing is started: (0, 1, device). Returns (rank, world size, device).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    elif device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    rank, size = world()
    return rank, size, device


def keyed_generator(seed: int, step: int, block: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, step, block): the noise of one block of a step's global batch.

    The seed is the first 8 bytes of SHA-256 of "seed:step:block", so neighbouring keys do not give
    related streams. The same key gives the same draws on any rank and in any process layout.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{block}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def split_blocks(batch, blocks: int) -> list:
    """Split a batch (a tensor, or a tuple / list of tensors with the same first dimension) into
    ``blocks`` equal consecutive blocks along the first dimension; ValueError if it does not divide."""
    first = batch if isinstance(batch, torch.Tensor) else batch[0]
    n = first.shape[0]
    if blocks < 1 or n % blocks:
        raise ValueError(f"a batch of {n} examples does not split into {blocks} equal blocks: make the batch "
                         f"size a multiple of the number of blocks (processes x shards)")
    size = n // blocks
    if isinstance(batch, torch.Tensor):
        return list(batch.split(size))
    parts = [x.split(size) for x in batch]
    return [type(batch)(p[i] for p in parts) for i in range(blocks)]


class LossModule(nn.Module):
    """``forward(batch, generator) = loss_fn(model, batch, generator)``, as a module of ``model``.

    Wrapped in DistributedDataParallel it makes the whole loss one DDP forward, so a loss that calls
    other methods of its network (Patch-DM's ``net.encode`` / ``net.decode``) still gets its gradients
    averaged across processes. ``precision`` "bf16" runs the loss under bf16 autocast.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, forward_model: Callable | None = None,
                 precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self._forward_model = forward_model          # e.g. torch.compile(model); same parameters
        self.precision = precision

    def forward(self, batch, generator):
        net = self.model if self._forward_model is None else self._forward_model
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.loss_fn(net, batch, generator)
        return loss.float()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (on ``device``'s GPU, or the CPU), when a process group of
    more than one process runs; otherwise ``module`` itself. DDP broadcasts rank 0's weights at once,
    so every process starts from the same model."""
    if world()[1] == 1:
        return module
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each logged value over the processes (the loss of the global batch), for the log;
    the values themselves when one process runs."""
    if world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    t /= world()[1]
    return dict(zip(keys, t.tolist(), strict=True))


def all_gather_objects(obj) -> Sequence:
    """Every process's ``obj`` (JSON-like), in rank order; [obj] with one process."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def accumulate(forward: Callable, batch, generators, module: nn.Module | None = None,
               backward: Callable | None = None) -> dict[str, float]:
    """One gradient over the blocks of a batch (gradient accumulation; a train step's inner loop).

    ``generators`` is one generator, or a list of them: the batch is then split into that many equal
    blocks (:func:`split_blocks`). For each block, ``forward(block, generator) -> (loss, logged)`` and
    ``backward(loss / n_blocks)`` (default ``loss.backward()``), so the gradient is the mean over
    blocks. When ``module`` is DistributedDataParallel, only the last block's backward averages the
    gradients across processes (``no_sync`` for the others). Returns the mean over blocks of every
    logged value. With one generator this is exactly ``forward`` and ``backward(loss)``.
    """
    gens = list(generators) if isinstance(generators, list | tuple) else [generators]
    parts = [batch] if len(gens) == 1 else split_blocks(batch, len(gens))
    backward = backward or torch.Tensor.backward
    totals: dict[str, float] = {}
    for j, (part, gen) in enumerate(zip(parts, gens, strict=True)):
        local = j < len(gens) - 1 and hasattr(module, "no_sync")
        with module.no_sync() if local else nullcontext():
            loss, logged = forward(part, gen)
            backward(loss if len(gens) == 1 else loss / len(gens))
        for key, value in logged.items():
            totals[key] = totals.get(key, 0.0) + value / len(gens)
    return totals


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every process (in place; nothing with one
    process). The EMA is kept on rank 0 only and broadcast once, at the end of a run."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    """Wait for every process (nothing to wait for with one)."""
    if world()[1] > 1:
        dist.barrier()
