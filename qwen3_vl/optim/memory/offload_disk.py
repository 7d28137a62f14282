"""Weights memory-mapped from safetensors files on disk; streamed layer by layer, never all in RAM.

Checkpoints are read as memory maps (``qwen3_vl.checkpoint.read_safetensors``), so a model kept
in its checkpoint's dtype already points into the files. Weights that do not (a preset's random
weights, a dtype conversion, quantized weights) are written once to an offload file in
``folder`` (a temporary directory by default, removed with the model) and mapped back.

On a GPU: the planner's streamed units go file pages -> a pinned staging buffer (on a background
thread, so the next layer is read while the current one computes) -> one of two recycled device
buffers, as in ``offload_cpu``; the pages are released after each copy.

On a CPU (the meaningful CPU semantics): the layers are computed in place from the mapped pages,
and after each streamed unit (decoder layer, ViT block, and the output matrix) runs its pages
are released from the process (``madvise(MADV_DONTNEED)``), so the resident set holds about one
unit of weights at a time; the kernel's page cache keeps them while memory allows and re-reads
them from disk when not. Both are exact, the same bytes reach the kernels. On a GPU they are
staged through 64-byte aligned buffers, so logits are bitwise equal to ``resident``. On a CPU the
layers compute at the file's addresses: a checkpoint's tensors are only 8-byte aligned, where CPU
kernels may round differently (measured: 7e-7 relative on tiny, far inside 1e-5); ``copy=true``
writes the streamed weights once into a 64-byte aligned offload file (the layout weights not from
a checkpoint always get), which makes CPU runs bitwise equal too, at the cost of that disk space.

Before a unit's weights are touched its backing files are checked against the sizes the headers
promised, so a file truncated after loading raises ``CheckpointError`` instead of crashing the
process with SIGBUS (a missing or truncated file at load fails in ``from_pretrained``).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from qwen3_vl.checkpoint import (
    CheckpointError,
    mapping_of,
    materialize_mapped,
    read_safetensors,
    release_pages,
    write_aligned_safetensors,
)
from qwen3_vl.optim.memory.offload_cpu import place
from qwen3_vl.optim.memory.planner import parse_bytes, plan_memory
from qwen3_vl.optim.memory.streaming import LayerStreamer, Unit, _bind, _tensors_of, pack_unit
from qwen3_vl.optim.plan import Optimization


def map_to_files(modules: dict[str, torch.nn.Module], folder: Path, copy: bool) -> int:
    """Make every tensor of ``modules`` file-backed: write those that are not (all of them with
    ``copy``) to one 64-byte aligned safetensors file in ``folder`` and point the modules at its
    mapping. Returns the bytes written."""
    pending, owners = {}, {}
    for unit_name, module in modules.items():
        for i, (owner, kind, name, t) in enumerate(_tensors_of(module)):
            if copy or mapping_of(t) is None:
                key = f"{unit_name}.{i}"
                pending[key] = t.detach().contiguous()
                owners[key] = (owner, kind, name)
    if not pending:
        return 0
    path = folder / "offload.safetensors"
    write_aligned_safetensors(pending, path)
    written = sum(t.numel() * t.element_size() for t in pending.values())
    mapped = read_safetensors(path)
    for key, (owner, kind, name) in owners.items():
        _bind(owner, kind, name, mapped[key])
    return written


class FileChecks:
    """The mappings some tensors live in, the size each file must keep, and their whole pages."""

    def __init__(self, tensors: list[torch.Tensor], what: str, strict: bool = True) -> None:
        needs: dict[int, list] = {}
        self.ranges = []  # (mmap, page-aligned start, length) fully inside the tensors
        for t in tensors:
            found = mapping_of(t)
            if found is None:
                if not strict:
                    continue
                raise CheckpointError(f"{what}: a weight is not backed by a file; cannot offload it to disk")
            mm, offset, path = found
            end = offset + t.numel() * t.element_size()
            entry = needs.setdefault(id(mm), [mm, 0, path])
            entry[1] = max(entry[1], end)
            self.ranges.append((mm, offset, end - offset))
        self.needs = list(needs.values())

    def check(self) -> None:
        for mm, end, path in self.needs:
            if mm.size() < end:
                raise CheckpointError(f"weight file {path} was truncated after loading: it has {mm.size()} bytes, "
                                      f"the weights need {end}; reload the model from an intact checkpoint")

    def release(self) -> None:
        for mm, offset, length in self.ranges:
            release_pages(mm, offset, length)


class PinnedStager:
    """Two pinned staging buffers: file pages are gathered into one while the other is copied."""

    def __init__(self, nbytes: int, checks: dict[int, FileChecks]) -> None:
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0
        self.checks = checks

    def fetch(self, unit: Unit) -> torch.Tensor:
        i = self.turn
        self.turn = 1 - self.turn
        self.events[i].synchronize()  # the copy that last read this staging buffer is done
        check = self.checks[id(unit)]
        check.check()
        unit.gather_into(self.buffers[i])
        check.release()
        return self.buffers[i][: unit.nbytes]

    def release(self, source: torch.Tensor, stream) -> None:
        i = 0 if source.data_ptr() == self.buffers[0].data_ptr() else 1
        self.events[i].record(stream)


class DiskOffload:
    name = "offload_disk"

    def __init__(self, model, target, budget: str | int = "", folder: str = "", copy: bool = False,
                 context: int = 4096, prefill: int = 2048, slots: int = 2) -> None:
        self.device = torch.device(target.device)
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="qwen3vl-offload-"))
        if not folder:
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        elif not self.folder.is_dir():
            raise ValueError(f"offload_disk folder '{folder}' does not exist")
        budget_bytes = parse_bytes(budget) if budget not in ("", 0) else None
        dtype_bytes = 4 if model.compute_dtype == torch.float32 else 2
        kv = model.plan["kv_cache"].name if model.plan is not None else "dynamic"
        self.plan = plan_memory(model, budget_bytes, context=context, prefill=prefill, dtype_bytes=dtype_bytes,
                                kv_name=kv)
        self.kv_hot_tokens = self.plan.kv_hot_tokens
        self.streamer = None
        self.handles = []
        self.copy = copy
        if self.device.type == "cpu":
            self._setup_cpu(model)
        else:
            self._setup_device(model, slots)

    def _streamed_modules(self, model) -> dict[str, torch.nn.Module]:
        mods = {}
        if self.plan.stream_vision:
            mods.update({f"visual.blocks.{i}": b for i, b in enumerate(model.visual.blocks)})
        layers = model.language_model.layers
        mods.update({f"language_model.layers.{i}": layers[i] for i in self.plan.streamed_layers})
        return mods

    def _setup_cpu(self, model) -> None:
        modules = self._streamed_modules(model)
        if self.plan.budget is None:
            modules["lm_head"] = model.lm_head  # half of a small model's bytes when tied
        self.written_bytes = map_to_files(modules, self.folder, self.copy)
        self.units = [pack_unit(name, m, in_place=True) for name, m in modules.items()]
        self.checks = {id(u): FileChecks(u.host_views, u.name) for u in self.units}
        in_units = {t.data_ptr() for u in self.units for t in u.host_views}
        materialize_mapped([t for t in [*model.parameters(), *model.buffers()] if t.data_ptr() not in in_units])
        # Everything else that lives in a file (embedding, norms, ...) is checked before the first
        # module of a step touches it, so a truncated file is an error, not a SIGBUS.
        whole = FileChecks([*model.parameters(), *model.buffers()], "model", strict=False)
        for first in (model.language_model.embed_tokens, model.visual):
            self.handles.append(first.register_forward_pre_hook(lambda m, a, c=whole: c.check()))
        for unit in self.units:
            check = self.checks[id(unit)]
            self.handles.append(unit.module.register_forward_pre_hook(lambda m, a, c=check: c.check()))
            self.handles.append(unit.module.register_forward_hook(lambda m, a, o, c=check: (c.release(), o)[1]))
        for check in self.checks.values():
            check.release()  # writing the offload file or loading touched the pages
        self.resident_bytes = 0

    def _setup_device(self, model, slots: int) -> None:
        modules = self._streamed_modules(model)
        self.written_bytes = map_to_files(modules, self.folder, self.copy)
        names = {id(m): n for n, m in modules.items()}
        units, self.resident_bytes = place(model, self.plan, self.device,
                                           lambda n, m: pack_unit(names.get(id(m), n), m, in_place=True))
        self.units = units
        self.checks = {id(u): FileChecks(u.host_views, u.name) for u in units}
        if units:
            stager = PinnedStager(max(u.nbytes for u in units), self.checks)
            first_layer = len(model.visual.blocks) if self.plan.stream_vision else 0
            self.streamer = LayerStreamer(units, self.device, slots, stager, wrap_to=first_layer % len(units))

    def describe(self) -> dict:
        out = {"device_weight_bytes": self.resident_bytes + (self.streamer.device_bytes() if self.streamer else 0),
               "offloaded_bytes": sum(u.nbytes for u in self.units), "written_to_offload_file": self.written_bytes,
               "released_units": len(self.units), **self.plan.to_dict()}
        if self.streamer is not None:
            out.update(self.streamer.stats())
        return out

    def report(self) -> str:
        return self.plan.report()


OPTION = Optimization(
    name="offload_disk",
    axis="memory",
    exact=True,
    summary="Weights memory-mapped from the safetensors files; GPU: streamed via pinned staging into two "
    "recycled buffers; CPU: computed in place with each layer's pages released after use (low RSS).",
    build=lambda model, target, **params: DiskOffload(model, target, **params),
    defaults={"budget": "", "folder": "", "copy": False, "context": 4096, "prefill": 2048, "slots": 2},
    variants=({"budget": ""},),
)
