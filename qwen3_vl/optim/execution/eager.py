"""Eager execution: one Python-driven ``model.step`` per generated token. The reference."""

from __future__ import annotations

from qwen3_vl.generate import DecodeRequest, decode_loop
from qwen3_vl.optim.plan import Optimization


class EagerExecution:
    name = "eager"

    def new_cache(self, model, batch: int, max_tokens: int):
        return model.kv_cache.new(batch, max_tokens)

    def decode(self, model, request: DecodeRequest):
        return decode_loop(model, request)

    def describe(self) -> dict:
        return {"option": self.name}


OPTION = Optimization(
    name="eager",
    axis="execution",
    exact=True,
    reference=True,
    summary="Reference execution: the decode loop calls model.step once per token from Python.",
    build=lambda model, target: EagerExecution(),
)
