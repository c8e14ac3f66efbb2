"""The global batch is the setting; per-device batch and gradient accumulation derive from it.

    global_batch_size = micro_batch_size x gradient_accumulation_steps x world_size

A combination that cannot be met exactly is an error, never a silently changed batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """How one optimizer step's ``global_batch_size`` sequences are split."""

    global_batch_size: int
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int

    def __str__(self) -> str:
        return (f"global batch {self.global_batch_size} = micro batch {self.micro_batch_size} x "
                f"accumulation {self.gradient_accumulation_steps} x {self.world_size} worker(s)")


def plan_batch(global_batch_size: int, world_size: int, micro_batch_size: int | None = None) -> BatchPlan:
    """Derive the per-device batch and gradient accumulation from the global batch.

    Args:
        global_batch_size: sequences per optimizer step over all workers.
        world_size: number of training processes.
        micro_batch_size: sequences per device per forward pass; None = global / world (no accumulation).

    Returns:
        The split, with ``micro x accumulation x world == global`` exactly.

    Raises:
        ValueError: when a count is < 1 or the global batch does not divide as required.
    """
    if global_batch_size < 1:
        raise ValueError(f"optim.global_batch_size must be >= 1; got {global_batch_size}")
    if world_size < 1:
        raise ValueError(f"scaling.num_workers must be >= 1; got {world_size}")
    if micro_batch_size is None:
        if global_batch_size % world_size:
            raise ValueError(
                f"optim.global_batch_size={global_batch_size} is not divisible by scaling.num_workers="
                f"{world_size}; use a multiple of {world_size} or change the number of workers"
            )
        return BatchPlan(global_batch_size, world_size, global_batch_size // world_size, 1)
    if micro_batch_size < 1:
        raise ValueError(f"optim.micro_batch_size must be >= 1; got {micro_batch_size}")
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"optim.global_batch_size={global_batch_size} is not divisible by optim.micro_batch_size="
            f"{micro_batch_size} x scaling.num_workers={world_size} = {per_step}; use a multiple of "
            f"{per_step}, or change micro_batch_size or num_workers"
        )
    return BatchPlan(global_batch_size, world_size, micro_batch_size, global_batch_size // per_step)
