"""Global batch -> per-device batch and accumulation; impossible splits are errors."""

from __future__ import annotations

import pytest

from bt_ray.train.batch import plan_batch


@pytest.mark.parametrize(("global_batch", "world", "micro", "expected"), [
    (128, 8, None, (16, 1)),
    (128, 8, 4, (4, 4)),
    (128, 1, 8, (8, 16)),
    (8, 2, 2, (2, 2)),
    (8, 1, 2, (2, 4)),
    (6, 3, None, (2, 1)),
])
def test_plan_meets_the_global_batch_exactly(global_batch, world, micro, expected):
    plan = plan_batch(global_batch, world, micro)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == expected
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size == global_batch
    assert f"global batch {global_batch}" in str(plan)


def test_indivisible_global_batch_is_an_error_naming_the_fields():
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not divisible by scaling.num_workers=4"):
        plan_batch(10, 4)
    with pytest.raises(ValueError, match=r"optim.micro_batch_size=4 x scaling.num_workers=3 = 12"):
        plan_batch(128, 3, 4)
    with pytest.raises(ValueError, match="optim.micro_batch_size must be >= 1"):
        plan_batch(8, 2, 0)
    with pytest.raises(ValueError, match="optim.global_batch_size must be >= 1"):
        plan_batch(0, 2)
