"""The ranks of one training group, and rank 0 telling the others what to run next.

One process per vLLM rank, on that rank's device, joined through a file rendezvous in the private run
dir (the supervisor removes it before starting a group). Compute collectives use NCCL on GPUs and gloo
on CPUs; commands go over a gloo group whose waits never time out (a follower may wait hours for the
next job). A rank that dies breaks every other rank's next collective, so the group goes down together
and the supervisor restarts it.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from apollo_train.shared.protocol import rendezvous_path
from worker.trainer import StepHooks

IDLE_TIMEOUT = datetime.timedelta(days=365)  # a follower waiting for the next command
STEP_TIMEOUT = datetime.timedelta(minutes=30)  # a collective inside a step
LOOPBACK_ONLY = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class Group:
    """This process's place in the training group, and the command channel (rank 0 -> the others)."""

    CHECKSUMS = "checksums"  # rank 0 hands every vLLM rank's weight checksums to the others at start

    def __init__(self, run_dir: str | os.PathLike, rank: int, size: int, device: torch.device):
        for name in LOOPBACK_ONLY:  # every rank runs on this host: nothing on the network reaches them
            os.environ.setdefault(name, "lo")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=rendezvous_path(run_dir).resolve().as_uri(), rank=rank,
                                world_size=size, timeout=STEP_TIMEOUT)
        self.commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.rank, self.size = rank, size

    def announce(self, op: str, *args) -> None:
        """Rank 0: the others run `op` with `args` (small, picklable: a batch of token ids at most); the
        recipe's group operations (worker/recipe.py) are announced this way."""
        dist.broadcast_object_list([(op, args)], src=0, group=self.commands)

    def receive(self) -> tuple[str, tuple]:
        """A follower: the next command, waiting as long as it takes."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def all_agree(self, ok: bool) -> bool:
        """True on every rank only if `ok` on every rank."""
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.commands)
        return bool(flag.item())


class StepNotTaken(RuntimeError):
    """Rank 0 could not start the step (e.g. vLLM did not pause); every rank leaves it untouched."""


class LockstepHooks(StepHooks):
    """The step hooks of every rank: no rank writes a weight before rank 0's own hooks ran (the step
    barrier pauses vLLM there), and rank 0 moves vLLM on only after every rank wrote its part."""

    def __init__(self, group: Group, inner: StepHooks | None = None):
        self.group, self.inner = group, inner

    @property
    def pauses_generation(self) -> bool:
        return self.inner is not None and self.inner.pauses_generation

    def before_step(self) -> None:
        error = None
        if self.inner is not None:
            try:
                self.inner.before_step()
            except Exception as exc:  # raised below, once the others know
                error = exc
        if not self.group.all_agree(error is None):
            raise error or StepNotTaken("rank 0 could not start the step; the step is skipped")

    def after_step(self) -> None:
        dist.barrier(group=self.group.commands)
        if self.inner is not None:
            self.inner.after_step()
