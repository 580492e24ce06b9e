"""Several processes, one run: PyTorch's own engine (torch.distributed, DDP, FSDP2), and the
few collectives the stages need.

Under `torchrun` every process runs the same stage code, each on its own device: the CPU
(gloo), or the GPU `cuda:LOCAL_RANK` (NCCL for tensors on the GPU, gloo for the few small
metric reductions and Python objects, which stay on the CPU). The data of a
step is the same on every rank (a seeded order over the same files); each rank takes its
contiguous share of it, runs forward and backward on that share, and the wrapper (DDP, or
FSDP2's `fully_shard`) reduces the gradients. Losses are normalised by the *global* count of
the step (tokens, pair weights), so the reduced gradient equals one process's gradient over
the whole step.

Outside torchrun every function here is the identity or a no-op: one process runs exactly
the single-process code path, with nothing to configure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tether.errors import TetherError

T = TypeVar("T")


class DistributedError(TetherError, RuntimeError):
    """The job's geometry does not fit the config (a batch that does not split evenly)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device | str = "cpu") -> World:
    """Join the torchrun job this process was started in; a plain process is a world of one.

    With models on a GPU the process group is `cpu:gloo,cuda:nccl`: collectives of GPU
    tensors (row gathers, gradient reductions) go over NCCL, those of CPU tensors (metric
    sums, pickled objects) over gloo. On the CPU it is gloo alone.
    """
    device = torch.device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return world()


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_distributed() -> bool:
    """True inside a torchrun job (even of one process): checkpoints then go through
    torch.distributed.checkpoint, so they can be resumed on another number of ranks."""
    return dist.is_available() and dist.is_initialized()


def several_ranks() -> bool:
    """More than one process: the collectives below have work to do."""
    return is_distributed() and world().size > 1


def fsdp_sharded(module: nn.Module) -> bool:
    """True where FSDP2 shards `module`'s parameters (DTensors). Its blocks free their
    gathered weights after each call, so a forward must call each block once: a pass split
    in two (a shared prompt, then the answers) would free weights its backward still needs."""
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def per_rank(count: int, what: str) -> int:
    """`count` (a global batch: the config's number) split over the ranks; it must divide."""
    size = world().size
    if count % size:
        raise DistributedError(
            f"{what} = {count} does not split evenly over {size} ranks; use a multiple of {size}"
        )
    return count // size


def shard(items: Sequence[T], what: str = "train.batch_size") -> list[T]:
    """This rank's contiguous share of a step's items; every rank gets the same number.

    Contiguous, so whole groups of consecutive items (GRPO's k samples per prompt) stay on one
    rank when the group count divides evenly.
    """
    share = per_rank(len(items), what)
    rank = world().rank
    return list(items[rank * share : (rank + 1) * share])


def eval_share(items: Sequence[T], filler: T) -> tuple[list[T], int]:
    """This rank's contiguous share of an evaluation set, and how many of it are real.

    The share is padded with `filler` to ⌈n / ranks⌉ items, so every rank runs the same number
    of batches: under FSDP every forward is a collective, and a rank with one batch fewer would
    leave the others waiting. `gather_real` puts the real results back in item order.
    """
    w = world()
    share = -(-len(items) // w.size)
    start = min(len(items), w.rank * share)
    mine = list(items[start : start + share])
    return mine + [filler] * (share - len(mine)), len(mine)


def gather_real(results: torch.Tensor, real: int) -> torch.Tensor:
    """Every rank's results for its `real` items (rows of `results`), in item order."""
    return torch.cat(gather(results[:real]))


def all_sum(value: float | torch.Tensor) -> torch.Tensor:
    """Σ over ranks (a float64 copy: sums of token counts and losses stay exact enough)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).clone()
    if several_ranks():
        dist.all_reduce(tensor)
    return tensor


def sum_metrics(metrics: dict[str, float], keep: Sequence[str] = ()) -> dict[str, float]:
    """Each rank's shares of global means, summed across ranks; `keep` keys are already the
    same on every rank (a gradient norm after the reduction) and are left as they are."""
    keys = sorted(k for k in metrics if k not in keep)
    if not keys or not several_ranks():
        return dict(metrics)
    summed = all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    return {**metrics, **{k: float(v) for k, v in zip(keys, summed.tolist(), strict=True)}}


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (Python objects: texts, small CPU tensors)."""
    if not several_ranks():
        return [obj]
    out: list[Any] = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of `tensors` ([B, L_r, ...] on rank r, the same B on every rank) concatenated over
    ranks along rows, with dim 1 zero-padded to the widest (responses end at different lengths
    on different ranks). The tensors stay on their device: one small gather of the widths,
    then one `all_gather` per tensor (NCCL for GPU tensors)."""
    if not several_ranks():
        return tensors
    widths = gather([t.shape[1] if t.dim() >= 2 else 0 for t in tensors])
    out = []
    for i, tensor in enumerate(tensors):
        width = max(rank_widths[i] for rank_widths in widths)
        sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        if tensor.dim() >= 2:
            pad = (0, 0) * (tensor.dim() - 2) + (0, width - tensor.shape[1])
            sent = torch.nn.functional.pad(sent, pad)
        sent = sent.contiguous()
        parts = [torch.empty_like(sent) for _ in range(world().size)]
        dist.all_gather(parts, sent)
        out.append(torch.cat(parts).to(tensor.dtype))
    return tuple(out)


def rows_of_rank(total_rows: int) -> slice:
    """The rows of a gathered tensor that came from this rank."""
    w = world()
    share = total_rows // w.size
    return slice(w.rank * share, (w.rank + 1) * share)


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not several_ranks():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if several_ranks():
        dist.barrier()


class Forward(nn.Module):
    """Runs `fn(model, *args)` as this module's forward.

    DDP reduces gradients only for computation that goes through the wrapper's `forward`, and
    FSDP2 gathers the root's parameters only there; the stages call their models through
    helpers (`sequence_scores`, `forward_responses`, a backbone's hidden states), so the
    wrapper's forward is "call this helper on the model" instead of the model's own forward.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


class Parallel:
    """A model ready to train under the job's engine: `parallel(fn, *args)` calls
    `fn(model, *args)` through DDP or FSDP2 (or directly, in a plain process).

    `loss_scale` undoes DDP's and FSDP's mean over ranks: the stages normalise each rank's loss
    by the step's global count already, so the reduced gradient must be the sum.
    """

    def __init__(
        self, model: nn.Module, mode: str = "ddp", bf16: bool = False, cpu_offload: bool = False
    ) -> None:
        self.model = model
        self.mode = mode if is_distributed() else "none"
        self.loss_scale = float(world().size)
        if world().size > 1:  # the same init everywhere; from here on, each rank's own stream
            torch.manual_seed(torch.initial_seed() + world().rank)
        if self.mode == "none":
            self._call: Callable[..., Any] = lambda fn, *a, **k: fn(model, *a, **k)
        elif self.mode == "ddp":
            if not any(p.requires_grad for p in model.parameters()):
                raise DistributedError("parallel: ddp needs at least one trainable parameter")
            on_gpu = next(model.parameters()).is_cuda
            self._call = nn.parallel.DistributedDataParallel(
                Forward(model),
                device_ids=[torch.cuda.current_device()] if on_gpu else None,
                broadcast_buffers=False,  # no trained buffers; and eval passes stay local
            )
        elif self.mode == "fsdp":
            self._call = shard_fully(model, bf16, cpu_offload)
        else:
            raise DistributedError(f"parallel: {mode!r} is not one of ddp, fsdp")

    @classmethod
    def of(cls, model: nn.Module | Parallel) -> Parallel:
        """`model` as is when already wrapped; a bare module is called directly (no wrapper),
        for callers outside a stage's training loop (evaluation tools, benchmarks)."""
        if isinstance(model, Parallel):
            return model
        plain = cls.__new__(cls)
        plain.model, plain.mode, plain.loss_scale = model, "none", 1.0
        plain._call = lambda fn, *a, **k: fn(model, *a, **k)
        return plain

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._call(fn, *args, **kwargs)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around the forward and backward of one micro-batch: gradients are reduced across
        ranks only on the `last` micro-batch of an optimizer step (once per step, not once
        per micro-batch; DDP needs the forward inside its `no_sync` too)."""
        if self.mode == "ddp" and not last:
            with self._call.no_sync():
                yield
            return
        if self.mode == "fsdp":
            self._call.set_requires_gradient_sync(last)
        yield

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[nn.Module]:
        """The model with every parameter whole on this rank, for work outside the wrapper
        (the rollout engine's weight export, `save_pretrained`). A no-op but under FSDP, where
        each sharded parameter is swapped for its all-gathered copy (every rank must enter
        together) and swapped back on exit. Tied weights stay tied: one copy per parameter."""
        if self.mode != "fsdp":
            yield self.model
            return
        whole: dict[int, nn.Parameter] = {}
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        for module in self.model.modules():  # the same order on every rank
            for name, param in list(module._parameters.items()):
                if param is None or not hasattr(param, "full_tensor"):
                    continue
                if id(param) not in whole:
                    whole[id(param)] = nn.Parameter(
                        param.detach().full_tensor(), requires_grad=param.requires_grad
                    )
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
        try:
            yield self.model
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param


BLOCK_SUFFIXES = ("DecoderLayer", "Block", "Layer")


def shard_fully(model: nn.Module, bf16: bool, cpu_offload: bool) -> nn.Module:
    """FSDP2: every transformer block, then the root, sharded over all ranks. With bf16 the
    forward and backward compute in bf16 over float32 shards and gradients are reduced in
    float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device, (world().size,))
    options: dict[str, Any] = {"mesh": mesh}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks, names = [], []  # the outermost modules named like a transformer block
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in names)
        if module.__class__.__name__.endswith(BLOCK_SUFFIXES) and not inside:
            blocks.append(module)
            names.append(name)
    if not blocks:
        raise DistributedError(
            f"parallel: fsdp found no transformer block (a module named *{BLOCK_SUFFIXES}) in "
            f"{type(model).__name__}; use parallel: ddp"
        )
    for block in blocks:
        fully_shard(block, **options)
    # The root too reshards after forward (FSDP2 keeps it whole by default, expecting a
    # backward): evaluation and reference passes run without one, and the optimizer and
    # `full_weights` must find the root's parameters sharded.
    return fully_shard(Forward(model), reshard_after_forward=True, **options)
