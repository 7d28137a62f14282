"""No quantization: weights stay in the model's storage dtype. The reference."""

from __future__ import annotations

from qwen3_vl.optim.plan import Optimization


class NoQuantization:
    name = "none"

    def __init__(self, model) -> None:
        self.weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def describe(self) -> dict:
        return {"weight_bytes": self.weight_bytes}


OPTION = Optimization(
    name="none",
    axis="quant",
    exact=True,
    reference=True,
    summary="Reference weights: stored in the model dtype, no quantization.",
    build=lambda model, target: NoQuantization(model),
)
