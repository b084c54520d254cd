"""Ranks: who this process is under ``accelerate launch``, and the few collectives uce needs.

Without a launch (no ``WORLD_SIZE`` above 1 in the environment) a run is rank 0 of 1, every
collective is the identity, and ``accelerate`` is never imported. Under ``accelerate launch`` (or
``torchrun``) accelerate's ``PartialState`` forms the process group; on the CPU it must be made
with ``cpu=True``, or the processes do not form a gloo group (measured with accelerate 1.15).

A launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
together. A ``WORLD_SIZE`` above 1 without the others (a stray variable left in a shell) is not a
launch: the process would wait forever for ranks that never start, so it is refused up front.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

from uce_cli.errors import UceError

T = TypeVar("T")


LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world() -> int:
    """The number of processes the launcher started (1 when uce was not launched).

    Raises:
        UceError: ``WORLD_SIZE`` says more than one process, but the rest of a launch is missing
            or out of range (module docstring) — before anything waits for the other ranks.
    """
    try:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1
    if world == 1:
        return 1
    missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
    rank = os.environ.get("RANK", "")
    problem = ""
    if missing:
        problem = f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
    elif not (rank.isdigit() and int(rank) < world):
        problem = f"RANK={rank} is not one of its ranks"
    if problem:
        raise UceError(
            f"WORLD_SIZE={world} is set, but {problem}: this is not a complete `accelerate "
            "launch`/`torchrun` launch, and the run would wait forever for the other ranks — "
            "unset WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) for a plain run, or start it with "
            "`accelerate launch`"
        )
    return world


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 when uce was not launched)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass
class Ranks:
    """This process's place among the launched ones; ``state`` is accelerate's, or None alone."""

    rank: int = 0
    world: int = 1
    state: Any = None

    @property
    def main(self) -> bool:
        """True on rank 0, the one that merges and writes shared results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world > 1

    def owns(self, index: int) -> bool:
        """Whether item ``index`` of a shared list is this rank's: index i goes to rank i % world."""
        return index % self.world == self.rank

    def share(self, items: list[T]) -> list[T]:
        """This rank's items of ``items`` (every world-th, from its rank), in order."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            self.state.wait_for_everyone()

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        # gather_object flattens one level of lists: wrap so each rank contributes one item.
        return list(gather_object([obj]))

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects; other ranks' values are ignored)."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]


def init_ranks(device: str = "auto") -> Ranks:
    """This process's ranks; under a launch, accelerate's state (``cpu=True`` for CPU sampling).

    Args:
        device: the ``--device`` of the command (``cpu``, ``cuda``, ``auto``, …).
    """
    if launched_world() == 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return Ranks(rank=state.process_index, world=state.num_processes, state=state)
