"""Switchable optimizations: the option record, plans, resolution with recorded fallbacks."""

from qwen3_vl.optim.plan import (
    Choice,
    Fallback,
    Optimization,
    Plan,
    PlanError,
    Requirements,
    Target,
    conflicts_of,
    make_plan,
    resolve,
)
from qwen3_vl.optim.registry import AXES, all_options, get, options, reference_option, reference_plan

__all__ = [
    "AXES",
    "Choice",
    "Fallback",
    "Optimization",
    "Plan",
    "PlanError",
    "Requirements",
    "Target",
    "all_options",
    "conflicts_of",
    "get",
    "make_plan",
    "options",
    "reference_option",
    "reference_plan",
    "resolve",
]
