"""The learner's batch under a memory limit (--max-memory).

Training memory is the parameters' state (weights, gradients, Adam's two moments, the best
snapshot, masks) plus what the forward pass saves for backward, which grows with the batch.
The second is measured, not guessed: one forward at batch 1 and one at batch 2 with
saved-tensor hooks, each storage counted once; the difference is the cost of one sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import OptionError
from ..resources import format_bytes, resident_bytes

# Backward holds activation gradients beside the saved activations, and kernels keep
# temporaries. ResNet-18 at 224x224 (tools/bench_memory_plan.py, batches 8/16/64): the peak
# grew 17.5 MiB per sample for 14.3 MiB saved per sample, 1.22x; 1.5x leaves a margin.
BACKWARD_FACTOR = 1.5
# In units of the parameters' fp32 size: weights, gradients, Adam's two moments, the best
# snapshot, the straight-through masks' temporaries (2), and the exact projection's float64
# scores, their protected copy and sorted copies (8), and a margin for the allocator (4): on
# ResNet-18 the peak after the plan varied 1017-1181 MiB between runs at batch 8. Plus the
# start trials (6): the weights before them, the trial kept for the run to continue (its
# weights and Adam's two moments, its candidate's masks as bytes) and a margin. Measured with
# trials (tools/bench_memory_plan.py --iters 12, batch 8): a peak of 1403 MiB after the plan,
# which 24 copies put at 1418.
PARAMETER_COPIES = 26


@dataclass(frozen=True)
class MemoryPlan:
    batch_size: int
    requested: int
    per_sample_bytes: int
    fixed_bytes: int
    limit_bytes: int
    rss_at_plan_bytes: int | None = None  # the process's resident memory when the plan was made
    graph_fixed: bool = False  # the batch is the graph's own (a fixed batch axis), not the memory's choice

    def estimate(self, batch: int) -> int:
        return self.fixed_bytes + batch * self.per_sample_bytes

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "requested_batch_size": self.requested,
                "per_sample_bytes": self.per_sample_bytes, "fixed_bytes": self.fixed_bytes,
                "limit_bytes": self.limit_bytes, "estimated_peak_bytes": self.estimate(self.batch_size),
                "rss_at_plan_bytes": self.rss_at_plan_bytes, "graph_fixed_batch": self.graph_fixed}


def saved_bytes(module, batch: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages one forward saves for backward (parameters included)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = module.run(dict(batch), batch_first=True)
        for value in outputs.values():  # outputs live until the loss is computed
            if isinstance(value, torch.Tensor):
                seen.setdefault(value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
    del outputs
    return sum(seen.values())


def plan_batch(module, train: Mapping[str, torch.Tensor], requested: int, limit: int, *,
               fixed_batch: int | None = None) -> MemoryPlan:
    """The largest batch <= ``requested`` whose estimated training peak fits in ``limit`` bytes.

    Raises OptionError when not even one sample (or the graph's fixed batch) fits.
    """
    params = [p for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        n = next(iter(train.values())).shape[0]
        # a fixed-batch graph runs only at its batch (Reshape constants may bake it in): measure
        # that batch once and count it all as per-sample
        one = saved_bytes(module, {k: v[:fixed_batch or 1] for k, v in train.items()})
        if n >= 2 and not fixed_batch:
            raw = max(saved_bytes(module, {k: v[:2] for k, v in train.items()}) - one, 0)
        else:
            raw = one
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    per_sample = int(BACKWARD_FACTOR * raw)
    fixed = PARAMETER_COPIES * param_bytes + max(one - raw, 0)
    if fixed_batch:
        plan = MemoryPlan(fixed_batch, requested, per_sample // fixed_batch, fixed, limit, resident_bytes(),
                          graph_fixed=True)
        if plan.estimate(fixed_batch) > limit:
            raise OptionError(
                f"learning at the graph's fixed batch {fixed_batch} needs about "
                f"{format_bytes(plan.estimate(fixed_batch))}, more than the {format_bytes(limit)} allowed; "
                "raise --max-memory, export the model with a dynamic batch, or use a data-free "
                "--method with --no-reconstruct")
        return plan
    fits = (limit - fixed) // per_sample if per_sample else requested
    if fits < 1:
        raise OptionError(
            f"learning needs about {format_bytes(fixed + per_sample)} even at batch 1 "
            f"({format_bytes(fixed)} for the parameters' state, {format_bytes(per_sample)} per sample), "
            f"more than the {format_bytes(limit)} allowed; raise --max-memory, or use a data-free "
            "--method with --no-reconstruct")
    return MemoryPlan(int(min(requested, fits)), requested, per_sample, fixed, limit, resident_bytes())
