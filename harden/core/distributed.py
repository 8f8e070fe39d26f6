"""torch.distributed for harden: the world a command runs in, and per-sample work split across its ranks.

A command runs in one process unless it was launched by ``torchrun`` (or by ``--workers N``, which runs
torchrun's own launcher): then every rank runs the same command, :func:`session` joins them into one process
group (gloo on CPU, NCCL on CUDA), and work is split so that the merged result is the single-process one.

Per-sample work (certificates, attacks, scores) is split by *chunks*: the samples are cut into fixed-size
chunks exactly as a single process cuts them, chunk ``i`` goes to rank ``i % size`` and :func:`map_chunks`
returns every chunk's result, in chunk order, on every rank.  Each chunk is computed with the same batch as in
one process, so the merged result is the single-process result bit for bit (no batch-size-dependent kernel,
no summation in another order).  Randomness inside a chunk must be seeded by the chunk (:func:`chunk_seed`),
never drawn from a stream that runs across chunks.

With one process every function here is a plain loop or the identity: no process group is needed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# torchrun's environment for each rank.
RANK_ENV, WORLD_ENV, LOCAL_RANK_ENV = "RANK", "WORLD_SIZE", "LOCAL_RANK"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def writer(self) -> bool:
        """Rank 0 alone prints results and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"


def launched() -> bool:
    """Whether this process is one rank of several, started by torchrun (its environment says so)."""
    return int(os.environ.get(WORLD_ENV, "1") or "1") > 1


def world() -> World:
    """The world of the current process group; one process (rank 0 of 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get(LOCAL_RANK_ENV, "0")),
                     dist.get_backend())
    return World()


def rank_device(device: str) -> str:
    """A rank's device: ``cuda`` means this rank's own GPU (its local rank) when several ranks share a node."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get(LOCAL_RANK_ENV, '0'))}"
    return device


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[World]:
    """Join the process group when launched by torchrun (NCCL for a CUDA device, gloo otherwise); leave it at
    the end.  Without torchrun: one process, no group."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    from harden.errors import HardenError

    if not dist.is_available():
        raise HardenError("this torch build has no torch.distributed: run without torchrun / --workers")
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise HardenError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(int(os.environ.get(LOCAL_RANK_ENV, "0")))
    # The launcher stops the other ranks with SIGTERM when one fails: exit through Python, so that a temporary
    # output file is removed on the way out (harden.io.atomic) instead of left behind.
    previous = signal.signal(signal.SIGTERM, _terminate)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield world()
        barrier()   # every rank is done before any leaves: no teardown meets a peer's work in flight
    finally:
        # A DistributedDataParallel module left in a reference cycle keeps gloo work alive; freed at interpreter
        # shutdown, after the group is gone, it aborts the process (SIGABRT). Collect it while all is alive.
        gc.collect()
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------------- collectives


def broadcast(value: T) -> T:
    """Rank 0's value on every rank (any picklable object)."""
    if not world().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank."""
    w = world()
    if not w.distributed:
        return [value]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, value)
    return out


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over every rank (sum, max or min), in place and returned."""
    if world().distributed:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def agree(flag: bool) -> bool:
    """True on every rank only if ``flag`` is True on every rank (a decision all ranks must share)."""
    return bool(all(gather(bool(flag))))


def barrier() -> None:
    if world().distributed:
        dist.barrier()


# ------------------------------------------------------------------------------------------------- chunks


def chunks(n: int, size: int) -> list[slice]:
    """``range(n)`` cut into slices of ``size`` (the last may be shorter), as one process cuts it."""
    size = max(1, int(size))
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def my_chunks(n: int, size: int) -> list[tuple[int, slice]]:
    """This rank's (index, slice) chunks: chunk i belongs to rank i % size (round robin balances the load)."""
    w = world()
    return [(i, s) for i, s in enumerate(chunks(n, size)) if i % w.size == w.rank]


def map_chunks(n: int, size: int, fn: Callable[[slice], T], *,
               progress: Callable[[int, int], None] | None = None) -> list[T]:
    """``[fn(chunk) for chunk in chunks(n, size)]``, each chunk computed by one rank, every result on every rank
    in chunk order.  ``progress(done, total)`` counts this rank's chunks."""
    mine = my_chunks(n, size)
    local = []
    for done, (i, rows) in enumerate(mine, 1):
        local.append((i, fn(rows)))
        if progress is not None:
            progress(done, len(mine))
    if not world().distributed:
        return [value for _, value in local]
    merged = dict(pair for part in gather(local) for pair in part)
    return [merged[i] for i in range(len(chunks(n, size)))]


def chunk_seed(seed: int, chunk: slice, purpose: str = "") -> int:
    """A 63-bit seed for the randomness of one chunk: the same in one process and in any split across ranks."""
    digest = hashlib.sha256(f"harden-chunk:{purpose}:{int(seed)}:{chunk.start}:{chunk.stop}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
