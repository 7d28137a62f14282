"""Resident weights: every tensor lives on the execution device. The reference."""

from __future__ import annotations

from qwen3_vl.checkpoint import materialize_mapped
from qwen3_vl.optim.memory.planner import module_bytes
from qwen3_vl.optim.plan import Optimization


class ResidentMemory:
    name = "resident"

    def __init__(self, model, target) -> None:
        model.to(target.device)
        # Checkpoints are read as memory maps; a resident model holds its own aligned copy.
        materialize_mapped([*model.parameters(), *model.buffers()])
        self.device_weight_bytes = module_bytes(model)  # each storage once (a tied matrix is one tensor)

    def describe(self) -> dict:
        return {"device_weight_bytes": self.device_weight_bytes, "offloaded_bytes": 0}


OPTION = Optimization(
    name="resident",
    axis="memory",
    exact=True,
    reference=True,
    summary="Reference placement: all weights resident on the execution device.",
    build=lambda model, target: ResidentMemory(model, target),
)
