"""Layer-by-layer weight streaming into recycled device buffers (shared by the offload options).

A *unit* is a module whose weights move as one block: a decoder layer, a ViT block. Each unit's
tensors (parameters and buffers, whatever their dtypes: quantized layers stream too) are packed
into one flat host byte buffer. The device holds ``slots`` (two) flat buffers the size of the
largest unit; they are reused by every unit in turn (cross-layer buffer recycling), so device
weight memory for streamed units is two units' worth.

A forward pre-hook on each unit makes sure its bytes are in a slot (copying them now if the
prefetch did not), points the unit's tensors at views of that slot, and starts copying the
*next* unit into the other slot on a side stream, so the copy overlaps this unit's compute. A
forward hook records that the unit's compute is done (the slot may be overwritten after that)
and points its tensors back at the host bytes. Every slot remembers which unit it holds, so a
prefetch that was overwritten (by another tower's unit) is simply copied again: correctness
never depends on the prefetch order.

The kernels see exactly the bytes they would see resident, at 64-byte aligned addresses, so the
logits are bitwise equal to a resident run with the same kernels.

On CUDA: pinned host memory, ``non_blocking`` copies on a side stream, events between streams.
The same code runs with a CPU "device" (no streams, synchronous copies into CPU slots), which is
how the bookkeeping is tested on machines without a GPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

ALIGN = 64


def _tensors_of(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner, "param" | "buffer", name, tensor) for every tensor of ``module``, each storage once."""
    out, seen = [], set()
    for owner in module.modules():
        for kind, table in (("param", owner._parameters), ("buffer", owner._buffers)):
            for name, t in table.items():
                if t is None or storage_key(t) in seen:
                    continue
                seen.add(storage_key(t))
                out.append((owner, kind, name, t))
    return out


def storage_key(t: torch.Tensor):
    """Identifies shared storage (tied weights); meta tensors (sizes only) have no address."""
    return id(t) if t.is_meta else (t.device, t.data_ptr())


def _bind(owner: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
    if kind == "param":
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor


@dataclass
class Entry:
    owner: nn.Module
    kind: str
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class Unit:
    name: str
    module: nn.Module
    entries: list[Entry]
    nbytes: int  # packed size (64-byte aligned entries)
    host: torch.Tensor | None  # flat packed bytes, or None when the tensors stay where they are
    host_views: list[torch.Tensor] = field(default_factory=list)  # what the module holds between uses

    def bind(self, flat: torch.Tensor) -> None:
        for e in self.entries:
            _bind(e.owner, e.kind, e.name, e.view(flat))

    def bind_host(self) -> None:
        for e, t in zip(self.entries, self.host_views, strict=True):
            _bind(e.owner, e.kind, e.name, t)

    def gather_into(self, flat: torch.Tensor) -> None:
        """Copy the unit's tensors into ``flat`` at their packed offsets."""
        for e, t in zip(self.entries, self.host_views, strict=True):
            e.view(flat).copy_(t)


def pack_unit(name: str, module: nn.Module, pin: bool = False, in_place: bool = False) -> Unit:
    """Describe ``module``'s tensors as one packed block.

    By default they are copied into one flat host buffer (pinned for CUDA) and the module is
    pointed at it. ``in_place=True`` leaves them where they are (memory-mapped file pages, for
    ``offload_disk``); a stager gathers them when the unit is loaded.
    """
    entries, offset = [], 0
    tensors = _tensors_of(module)
    for owner, kind, tname, t in tensors:
        n = t.numel() * t.element_size()
        entries.append(Entry(owner, kind, tname, offset, n, t.dtype, tuple(t.shape)))
        offset += (n + ALIGN - 1) // ALIGN * ALIGN
    if in_place:
        unit = Unit(name, module, entries, offset, None, [t.detach() for *_, t in tensors])
    else:
        host = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        unit = Unit(name, module, entries, offset, host, [e.view(host) for e in entries])
        for view, (*_, t) in zip(unit.host_views, tensors, strict=True):
            view.copy_(t.detach().reshape(view.shape))
    unit.bind_host()
    return unit


class Slot:
    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.owner: Unit | None = None
        self.pending = None  # a Future while a background load into this slot runs
        cuda = device.type == "cuda"
        self.ready = torch.cuda.Event() if cuda else None  # the copy into this slot finished
        self.free = torch.cuda.Event() if cuda else None  # the compute reading this slot finished


class LayerStreamer:
    """Streams ``units`` (in execution order) through ``slots`` recycled device buffers.

    Each unit's pre-hook prefetches the unit after it; after the last comes ``units[wrap_to]``.

    ``stager`` (optional) produces each unit's host bytes when they are not in memory already
    (``offload_disk``: file pages -> pinned staging); loads then run on one background thread,
    so reading the next unit overlaps the current unit's compute.
    """

    def __init__(self, units: list[Unit], device: torch.device, slots: int = 2, stager=None,
                 wrap_to: int = 0) -> None:
        if slots < 1:
            raise ValueError("streaming needs at least one device buffer")
        self.units, self.device = units, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stager = stager
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qwen3vl-stream") if stager is not None else None
        size = max((u.nbytes for u in units), default=0)
        self.slots = [Slot(size, self.device) for _ in range(min(slots, max(len(units), 1)))]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # The unit after the last one is ``units[wrap_to]``: the first decoder layer, which the next
        # decode step needs (the ViT blocks before it run only when an image is encoded).
        self.next_of = {id(u): units[i + 1] if i + 1 < len(units) else units[wrap_to] for i, u in enumerate(units)}
        self.last_slot = 0
        self.bytes_copied = 0
        self.copies = 0
        self.waited_loads = 0  # loads a pre-hook had to start itself (the prefetch missed)
        self.handles = []
        for unit in units:
            self.handles.append(unit.module.register_forward_pre_hook(self._make_pre(unit)))
            self.handles.append(unit.module.register_forward_hook(self._make_post(unit)))

    # -- hooks --------------------------------------------------------------------------------

    def _make_pre(self, unit: Unit):
        def pre_hook(module, args):
            slot = self._slot_holding(unit)
            if slot is None:
                self.waited_loads += 1
                slot = self._start_load(unit, self._other(self.last_slot))
            if slot.pending is not None:
                slot.pending.result()  # re-raises a failed background load here
                slot.pending = None
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.ready)
            unit.bind(slot.buffer)
            self.last_slot = self.slots.index(slot)
            nxt = self.next_of[id(unit)]
            if len(self.slots) > 1 and nxt is not unit and self._slot_holding(nxt) is None:
                self._start_load(nxt, self._other(self.last_slot))
        return pre_hook

    def _make_post(self, unit: Unit):
        def post_hook(module, args, output):
            if self.cuda:
                self._slot_holding(unit).free.record(torch.cuda.current_stream(self.device))
            unit.bind_host()
            return output
        return post_hook

    # -- slots --------------------------------------------------------------------------------

    def _other(self, index: int) -> Slot:
        return self.slots[(index + 1) % len(self.slots)]

    def _slot_holding(self, unit: Unit) -> Slot | None:
        return next((s for s in self.slots if s.owner is unit), None)

    def _start_load(self, unit: Unit, slot: Slot) -> Slot:
        if slot.pending is not None:  # a background load into this slot is still running
            slot.pending.result()
            slot.pending = None
        slot.owner = unit
        if self.pool is None:
            self._copy(unit, slot)
        else:
            slot.pending = self.pool.submit(self._copy_on_worker, unit, slot)
        self.bytes_copied += unit.nbytes
        self.copies += 1
        return slot

    def _copy_on_worker(self, unit: Unit, slot: Slot) -> None:
        # Inference mode is per thread: buffers made under the caller's inference mode can only be
        # written inside it, and writing ordinary tensors inside it is allowed too.
        with torch.inference_mode():
            self._copy(unit, slot)

    def _copy(self, unit: Unit, slot: Slot) -> None:
        source = self.stager.fetch(unit) if self.stager is not None else unit.host
        target = slot.buffer[: unit.nbytes]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)  # the unit that used this slot has finished
                target.copy_(source, non_blocking=True)
                slot.ready.record(self.copy_stream)
            if self.stager is not None:
                self.stager.release(source, self.copy_stream)
        else:
            target.copy_(source)

    def device_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self.slots)

    def stats(self) -> dict:
        return {"streamed_units": len(self.units), "device_buffer_bytes": self.device_bytes(),
                "bytes_copied": self.bytes_copied, "copies": self.copies, "missed_prefetches": self.waited_loads}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
