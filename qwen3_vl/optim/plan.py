"""The optimization record, the plan that picks one option per axis, and plan resolution.

An *option* (``Optimization``) is one way to do one job (an *axis*: attention, rope, kv_cache,
memory, quant, vision, ...). A *plan* names one option per axis. Resolving a plan against a
``Target`` (device, dtype, what is installed) replaces every unavailable option by its declared
fallback and records why, so nothing ever falls back silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class PlanError(ValueError):
    """A plan names an unknown axis/option/parameter or combines conflicting options."""


@dataclass(frozen=True)
class Target:
    """Where a model runs: what availability probes look at."""

    device: str = "cpu"  # a torch device string: "cpu", "cuda", "cuda:1"
    dtype: str = "fp32"  # "fp32", "fp16" (fp16 storage, fp32 compute) or "bf16"
    compute_capability: tuple[int, int] | None = None
    device_name: str = ""
    # Options a hardware profile's emulation mode forbids, e.g. SDPA backends Pascal lacks.
    emulated_profile: str | None = None

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


@dataclass(frozen=True)
class Requirements:
    """Declarative hardware/software requirements checked before an option's own probe."""

    devices: tuple[str, ...] = ("cpu", "cuda")
    min_compute_capability: tuple[int, int] | None = None
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    packages: tuple[str, ...] = ()  # importable module names

    def unmet(self, target: Target) -> str | None:
        if target.device_type not in self.devices:
            return f"needs device {' or '.join(self.devices)}, target is {target.device_type}"
        if self.min_compute_capability is not None and target.device_type == "cuda":
            cc = target.compute_capability
            if cc is None or tuple(cc) < tuple(self.min_compute_capability):
                need = ".".join(map(str, self.min_compute_capability))
                have = "unknown" if cc is None else ".".join(map(str, cc))
                return f"needs compute capability >= {need}, GPU has {have}"
        if target.dtype not in self.dtypes:
            return f"supports dtypes {', '.join(self.dtypes)}, not {target.dtype}"
        for pkg in self.packages:
            if not _importable(pkg):
                return f"package '{pkg}' is not installed"
        return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Optimization:
    """One registered option of one axis.

    ``build(**context, **params)`` returns the runtime object the model uses for this axis; what
    that object must provide is documented per axis in ``qwen3_vl/optim/registry.py``.
    ``error_budget`` maps a metric (``logits_rel``, ``kl``, ``top1_agreement``...) to its bound;
    it must be empty for exact options and non-empty for approximate ones.
    """

    name: str
    axis: str
    exact: bool
    summary: str
    build: Callable[..., Any]
    error_budget: Mapping[str, float] = field(default_factory=dict)
    requires: Requirements = field(default_factory=Requirements)
    conflicts: tuple[str, ...] = ()  # "axis=option" entries this option cannot be combined with
    # "axis=option|option" entries: this option runs only alongside one of the listed options.
    needs: tuple[str, ...] = ()
    fallback: str | None = None  # option of the same axis used when this one is unavailable
    probe: Callable[[Target], str | None] | None = None  # extra check; returns a reason or None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Parameter sets the combination matrix sweeps; empty means "the defaults only".
    variants: tuple[Mapping[str, Any], ...] = ()
    reference: bool = False

    def __post_init__(self) -> None:
        if self.exact and self.error_budget:
            raise PlanError(f"{self.axis}={self.name}: an exact option declares no error budget")
        if not self.exact and not self.error_budget:
            raise PlanError(f"{self.axis}={self.name}: an approximate option must declare an error budget")
        if self.reference and not self.exact:
            raise PlanError(f"{self.axis}={self.name}: a reference option must be exact")

    def unavailable(self, target: Target) -> str | None:
        """None when the option can run on ``target``, else a human-readable reason."""
        reason = self.requires.unmet(target)
        if reason is None and self.probe is not None:
            reason = self.probe(target)
        return reason


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, tuple):
        return "(" + " ".join(_format_value(v) for v in value) + ")"
    return str(value)


def _kind_mismatch(value: Any, default: Any) -> str | None:
    """What kind of value a parameter with this default takes, where ``value`` is not one (bools and numbers)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    return None


def _parse_value(text: str) -> Any:
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("(") and text.endswith(")"):
        return tuple(_parse_value(t) for t in text[1:-1].split())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True, order=True)
class Choice:
    """One option of one axis with its parameters (sorted, hashable)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + "[" + ";".join(f"{k}={_format_value(v)}" for k, v in self.params) + "]"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @classmethod
    def parse(cls, text: str) -> Choice:
        text = text.strip()
        match = re.fullmatch(r"([a-z][a-z0-9_]*)(?:\[(.*)\])?", text)
        if not match:
            raise PlanError(f"cannot parse option '{text}': expected name or name[key=value;...]")
        name, body = match.groups()
        params = []
        if body and re.search(r",\s*[a-z_][a-z0-9_]*\s*=", body):
            raise PlanError(f"cannot parse option '{text}': an option's parameters are separated by ';', not ',' "
                            f"(e.g. {name}[a=1;b=2])")
        if body:
            for item in body.split(";"):
                if "=" not in item:
                    raise PlanError(f"cannot parse parameter '{item}' of option '{name}': expected key=value")
                key, value = item.split("=", 1)
                params.append((key.strip(), _parse_value(value)))
        return cls(name, tuple(sorted(params)))


@dataclass(frozen=True)
class Plan:
    """One choice per axis; frozen, hashable, with a stable string id.

    Axes not named take their reference option. The id lists every axis in registry order:
    ``attention=eager,rope=standard,kv_cache=dynamic,memory=resident,quant=none,vision=full``.
    """

    choices: tuple[tuple[str, Choice], ...]

    def __getitem__(self, axis: str) -> Choice:
        for name, choice in self.choices:
            if name == axis:
                return choice
        raise KeyError(axis)

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(axis for axis, _ in self.choices)

    @property
    def id(self) -> str:
        return ",".join(f"{axis}={choice}" for axis, choice in self.choices)

    @property
    def short_id(self) -> str:
        """Only the axes that differ from the reference plan ("reference" when none do)."""
        from qwen3_vl.optim.registry import reference_option

        parts = [f"{a}={c}" for a, c in self.choices if c != Choice(reference_option(a).name)]
        return ",".join(parts) or "reference"

    def __str__(self) -> str:
        return self.id

    def with_(self, **changes: str | Choice) -> Plan:
        """A copy with some axes changed: ``plan.with_(attention="sdpa")``."""
        spec = {axis: str(choice) for axis, choice in self.choices}
        spec.update({axis: str(choice) for axis, choice in changes.items()})
        return make_plan(spec)

    def to_dict(self) -> dict[str, str]:
        return {axis: str(choice) for axis, choice in self.choices}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def parse(cls, text: str) -> Plan:
        """Parse a plan id or a partial spec such as ``"attention=sdpa,kv_cache=static"``.

        ``"reference"`` (or an empty string) is the reference plan.
        """
        text = text.strip()
        if text in ("", "reference"):
            return make_plan({})
        spec: dict[str, str] = {}
        for part in _split_top_level(text):
            if "=" not in part:
                raise PlanError(f"cannot parse '{part}' in plan '{text}': expected axis=option")
            axis, option = part.split("=", 1)
            axis = axis.strip()
            if axis in spec:
                raise PlanError(f"axis '{axis}' is given twice in plan '{text}'")
            spec[axis] = option.strip()
        return make_plan(spec)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] parameter lists."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


def make_plan(spec: Mapping[str, str | Choice] | None = None, **axes: str | Choice) -> Plan:
    """Build a validated plan; unnamed axes take their reference option.

    Unknown axes, options or parameters raise ``PlanError`` naming the valid ones.
    """
    from qwen3_vl.optim.registry import AXES, options

    merged: dict[str, str | Choice] = dict(spec or {})
    merged.update(axes)
    unknown_axes = sorted(set(merged) - set(AXES))
    if unknown_axes:
        raise PlanError(f"unknown axis '{unknown_axes[0]}'; axes are: {', '.join(AXES)}")
    choices = []
    for axis in AXES:
        registered = {opt.name: opt for opt in options(axis)}
        value = merged.get(axis)
        if value is None:
            choice = Choice(next(o.name for o in registered.values() if o.reference))
        else:
            choice = value if isinstance(value, Choice) else Choice.parse(str(value))
        opt = registered.get(choice.name)
        if opt is None:
            raise PlanError(
                f"unknown option '{choice.name}' for axis '{axis}'; options are: {', '.join(registered)}"
            )
        bad = sorted(k for k, _ in choice.params if k not in opt.defaults)
        if bad:
            allowed = ", ".join(opt.defaults) or "none"
            raise PlanError(f"{axis}={opt.name} has no parameter '{bad[0]}' (parameters: {allowed})")
        for key, value in choice.params:
            kind = _kind_mismatch(value, opt.defaults[key])
            if kind:
                raise PlanError(f"{axis}={opt.name} parameter '{key}' takes {kind}; got '{_format_value(value)}'")
        choices.append((axis, choice))
    return Plan(tuple(choices))


@dataclass(frozen=True)
class Fallback:
    """One recorded substitution made while resolving a plan."""

    axis: str
    requested: str
    used: str
    reason: str

    def __str__(self) -> str:
        return f"{self.axis}: {self.requested} -> {self.used} ({self.reason})"


def failure_text(exc: BaseException, limit: int = 2000) -> str:
    """``Type: message`` of an exception that made an option fall back at run time, as ``describe()`` and the
    warning show it: the whole message where it fits in ``limit`` characters, else its first line and as many of
    its last lines as fit (an Inductor compile worker's error says only "An exception occurred in a subprocess"
    on its first line; the cause is at the end)."""
    text = str(exc).strip()
    whole = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(whole) <= limit:
        return whole
    first, *rest = text.splitlines()
    head = f"{type(exc).__name__}: {first[:limit // 2]}\n...\n"
    tail: list[str] = []
    room = limit - len(head)
    for line in reversed(rest):
        if len(line) + 1 > room:
            break
        tail.insert(0, line)
        room -= len(line) + 1
    return head + "\n".join(tail)


def conflicts_of(plan: Plan) -> list[str]:
    """Human-readable reasons why the plan's options cannot be combined (empty when fine)."""
    from qwen3_vl.optim.registry import get

    chosen = {f"{axis}={choice.name}" for axis, choice in plan.choices}
    names = {axis: choice.name for axis, choice in plan.choices}
    reasons = []
    for axis, choice in plan.choices:
        opt = get(axis, choice.name)
        for other in opt.conflicts:
            if other in chosen:
                reasons.append(f"{axis}={choice.name} conflicts with {other}")
        for need in opt.needs:
            other_axis, allowed = need.split("=", 1)
            if names.get(other_axis) not in allowed.split("|"):
                reasons.append(f"{axis}={choice.name} needs {need} (plan has {other_axis}={names.get(other_axis)})")
    return reasons


def resolve(plan: Plan, target: Target) -> tuple[Plan, list[Fallback]]:
    """Replace every option unavailable on ``target`` along its fallback chain.

    Returns the plan that will actually run and the list of substitutions with their reasons.
    Raises ``PlanError`` when options conflict or a chain ends without an available option.
    """
    from qwen3_vl.optim.registry import get

    resolved: dict[str, Choice] = {}
    records: list[Fallback] = []
    for axis, choice in plan.choices:
        current, seen = choice, []
        while True:
            opt = get(axis, current.name)
            reason = opt.unavailable(target)
            if reason is None:
                break
            seen.append(current.name)
            if opt.fallback is None or opt.fallback in seen:
                raise PlanError(f"{axis}={current.name} is unavailable ({reason}) and has no fallback left")
            records.append(Fallback(axis, str(current), opt.fallback, reason))
            current = Choice(opt.fallback)
        resolved[axis] = current
    used = make_plan(resolved)
    clash = conflicts_of(used)
    if clash:
        raise PlanError("; ".join(clash))
    return used, records
