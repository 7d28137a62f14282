"""Offloaded weights: streaming through recycled buffers and memory-mapped files is bit-exact.

No GPU here: ``OffloadedWeights`` runs with a CPU target, streaming each layer from its packed host
copy into two recycled CPU buffers: the same hooks, prefetch and slot bookkeeping as on a GPU,
without streams. ``offload_disk`` runs its real CPU semantics (mapped pages released per layer).
"""

from __future__ import annotations

import gc
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import qwen3_vl
from qwen3_vl.checkpoint import CheckpointError, mapping_of
from qwen3_vl.optim.memory import offload_disk
from qwen3_vl.optim.memory.offload_cpu import OffloadedWeights
from qwen3_vl.optim.memory.streaming import LayerStreamer

from ..kv_cache.drive import conversation, prompt
from ..kv_cache.drive import reference as shared_reference


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()

CONFIG = qwen3_vl.config.preset("tiny")
PROMPT = prompt("padded")  # two rows padded to one length, two images


def reference(plan: str = "reference", steps: int = 64):
    return shared_reference("padded", plan, steps)


def streamed(plan: str = "reference", **kwargs):
    model = qwen3_vl.from_pretrained("tiny", seed=0, plan=plan)
    model.memory = OffloadedWeights(model, model.target, **kwargs)
    return model


def slot_pointers(streamer: LayerStreamer) -> set[int]:
    return {s.buffer.data_ptr() for s in streamer.slots}


def test_streamed_weights_give_bitwise_equal_logits_through_two_turns():
    model = streamed()
    logits, _, _ = conversation(model, PROMPT, tokens=reference()[1])
    assert torch.equal(logits, reference()[0])
    streamer = model.memory.streamer
    assert len(streamer.slots) == 2  # two recycled buffers, whatever the number of layers
    assert len(streamer.units) == CONFIG.text.num_hidden_layers + CONFIG.vision.depth
    assert streamer.device_bytes() == 2 * max(u.nbytes for u in streamer.units)
    # the next layer was prefetched every time except the very first load
    assert streamer.waited_loads == 1
    # between steps the modules hold their host copies, never a slot that will be overwritten
    weight = model.language_model.layers[2].mlp.up_proj.weight
    assert all(not (p <= weight.data_ptr() < p + streamer.slots[0].buffer.numel()) for p in slot_pointers(streamer))


def test_quantized_layers_stream_too():
    plan = "quant=int8_weight[kernel=dequant]"
    model = streamed(plan)
    logits, _, _ = conversation(model, PROMPT, steps=16, turn2=0, steps2=0, tokens=reference(plan, 16)[1])
    assert torch.equal(logits, reference(plan, 16)[0])


def test_one_buffer_still_exact():
    model = streamed(slots=1)
    logits, _, _ = conversation(model, PROMPT, steps=8, turn2=0, steps2=0, tokens=reference()[1])
    assert torch.equal(logits, reference()[0][:, :9])
    assert len(model.memory.streamer.slots) == 1


def test_a_wrong_slot_is_caught(monkeypatch):
    """Plant a bookkeeping fault (a unit bound to whatever the other slot holds): the exactness check fails."""
    model = streamed()
    streamer = model.memory.streamer
    real = streamer._slot_holding
    monkeypatch.setattr(streamer, "_slot_holding",
                        lambda unit: next((s for s in streamer.slots if s.owner is not None and s.owner is not unit),
                                          None) or real(unit))
    logits, _, _ = conversation(model, PROMPT, steps=4, turn2=0, steps2=0, tokens=reference()[1])
    assert not torch.equal(logits, reference()[0][:, :5])


class HostStager:
    """The staging interface ``offload_disk`` gives the streamer on a GPU, from host copies: loads then
    run on the streamer's background thread, as they do there."""

    def fetch(self, unit):
        return unit.host

    def release(self, source, stream) -> None:
        pass


def test_background_loads_under_inference_mode_are_exact():
    """Found on an H200: a model built and run under ``torch.inference_mode()`` failed every background
    load ("inplace update to inference tensor outside InferenceMode"), since the mode is per thread."""
    with torch.inference_mode():
        model = qwen3_vl.from_pretrained("tiny", seed=0)
        model.memory = OffloadedWeights(model, model.target)
        streamer = model.memory.streamer
        streamer.stager = HostStager()
        streamer.pool = ThreadPoolExecutor(1)
        logits, _, _ = conversation(model, PROMPT, steps=4, turn2=0, steps2=0, tokens=reference()[1])
    assert torch.equal(logits, reference()[0][:, :5])
    assert streamer.copies > 2 * len(streamer.units)


def test_offload_cpu_falls_back_to_resident_on_a_cpu_with_the_reason():
    model = qwen3_vl.from_pretrained("tiny", plan="memory=offload_cpu[budget=1GiB]")
    assert model.plan["memory"].name == "resident"
    (fallback,) = [f for f in model.fallbacks if f.axis == "memory"]
    assert fallback.requested.startswith("offload_cpu") and "needs device cuda" in fallback.reason


# ---------------------------------------------------------------------------------------------
# offload_disk


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    qwen3_vl.save_pretrained(qwen3_vl.from_pretrained("tiny", seed=0), path)
    return path


def test_a_resident_model_from_a_checkpoint_is_bitwise_the_preset(checkpoint):
    model = qwen3_vl.from_pretrained(checkpoint)
    assert mapping_of(model.lm_head.weight) is None  # copied out of the mapping, 64-byte aligned
    logits, _, _ = conversation(model, PROMPT, steps=4, turn2=0, steps2=0, tokens=reference()[1])
    assert torch.equal(logits, reference()[0][:, :5])


def test_offload_disk_computes_from_the_checkpoint_pages(checkpoint, monkeypatch):
    released = []
    real = offload_disk.FileChecks.release
    monkeypatch.setattr(offload_disk.FileChecks, "release", lambda self: (released.append(1), real(self)))
    model = qwen3_vl.from_pretrained(checkpoint, plan="memory=offload_disk")
    assert model.memory.written_bytes == 0  # nothing copied: the layers compute from the checkpoint's pages
    assert mapping_of(model.language_model.layers[1].self_attn.q_proj.weight)[2].name == "model.safetensors"
    logits, tokens, _ = conversation(model, PROMPT)
    # the file's 8-byte alignment may change CPU rounding: exact within fp32 tolerance, same greedy tokens
    assert relative_error(logits, reference()[0]) <= 1e-5
    assert torch.equal(tokens, reference()[1])
    units = len(model.memory.units)  # layers, ViT blocks and the output matrix
    assert units == CONFIG.text.num_hidden_layers + CONFIG.vision.depth + 1
    steps = 1 + 64 + 1 + 8  # prefill, decode, second turn, decode
    # each unit's pages are released once at setup and after each of its runs
    assert len(released) == units + (CONFIG.text.num_hidden_layers + 1) * steps + CONFIG.vision.depth


def test_an_aligned_offload_copy_is_bitwise_exact(checkpoint):
    model = qwen3_vl.from_pretrained(checkpoint, plan="memory=offload_disk[copy=true]")
    assert model.memory.written_bytes > 0
    logits, _, _ = conversation(model, PROMPT, steps=8, turn2=0, steps2=0, tokens=reference()[1])
    assert torch.equal(logits, reference()[0][:, :9])


def test_offload_disk_writes_an_offload_file_for_weights_not_in_a_checkpoint(tmp_path):
    model = qwen3_vl.from_pretrained("tiny", seed=0, plan=f"memory=offload_disk[folder={tmp_path}]")
    assert model.memory.written_bytes > 0 and (tmp_path / "offload.safetensors").exists()
    assert mapping_of(model.lm_head.weight) is not None
    logits, _, _ = conversation(model, PROMPT, steps=8, turn2=0, steps2=0, tokens=reference()[1])
    assert torch.equal(logits, reference()[0][:, :9])


def test_missing_or_truncated_weight_files_fail_at_load(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated .* ends at byte"):
        qwen3_vl.from_pretrained(checkpoint, plan="memory=offload_disk")
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"missing: shard-1.safetensors"):
        qwen3_vl.from_pretrained(checkpoint, plan="memory=offload_disk")


def test_a_file_truncated_after_loading_is_an_error_not_a_crash(checkpoint):
    model = qwen3_vl.from_pretrained(checkpoint, plan="memory=offload_disk")
    path = checkpoint / "model.safetensors"
    with open(path, "r+b") as f:  # in place: the mapping now runs past the end of the file
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="was truncated after loading"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    del model
    gc.collect()
