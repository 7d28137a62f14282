"""Checkpoint loading: round trips, both config layouts, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen3_vl
from qwen3_vl.checkpoint import CheckpointError, hf_state_dict, load_hf_state_dict
from qwen3_vl.config import ConfigError, from_hf


@pytest.fixture()
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


def test_round_trip_is_bitwise(tiny_checkpoint, tmp_path):
    first = qwen3_vl.from_pretrained(tiny_checkpoint)
    qwen3_vl.save_pretrained(first, tmp_path / "again")
    second = qwen3_vl.from_pretrained(tmp_path / "again")
    a, b = hf_state_dict(first), hf_state_dict(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in a  # tied: the head is the embedding


def test_untied_checkpoint_round_trip(tmp_path):
    config = qwen3_vl.PRESETS["tiny"].replace(tie_word_embeddings=False)
    model = qwen3_vl.build(config, None, seed=3)
    qwen3_vl.save_pretrained(model, tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    again = qwen3_vl.from_pretrained(tmp_path)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(again.lm_head.weight, again.language_model.embed_tokens.weight)


def test_sharded_checkpoint_loads(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, ckpt / name)
    (ckpt / "model.safetensors").unlink()
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    model = qwen3_vl.from_pretrained(ckpt)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), qwen3_vl.from_pretrained(ckpt.parent / "ckpt")(ids))


def test_v5_config_layout_loads_the_same(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg["text_config"]
    scaling = text.pop("rope_scaling")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": scaling["mrope_section"], "mrope_interleaved": True}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert from_hf(ckpt) == qwen3_vl.PRESETS["tiny"]


def _rewrite(ckpt, change):
    tensors = load_file(ckpt / "model.safetensors")
    change(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_missing_key(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.language_model\.layers\.1\.mlp\.up_proj"):
        qwen3_vl.from_pretrained(ckpt)


def test_unexpected_key(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.visual.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.visual\.extra\.weight"):
        qwen3_vl.from_pretrained(ckpt)


def test_wrong_shape(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.language_model.norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: model\.language_model\.norm\.weight: checkpoint \(31,\)"):
        qwen3_vl.from_pretrained(ckpt)


def test_untied_config_without_head(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys \(config says tie_word_embeddings=false\): lm_head"):
        qwen3_vl.from_pretrained(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or not a valid safetensors file"):
        qwen3_vl.from_pretrained(ckpt)


def test_pickle_checkpoints_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not even loaded")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints .* are refused"):
        qwen3_vl.from_pretrained(ckpt)


def test_missing_shard(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard files that are missing: model-00001\.safetensors"):
        qwen3_vl.from_pretrained(ckpt)


def test_bad_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        qwen3_vl.from_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        qwen3_vl.from_pretrained(ckpt)


def test_unknown_source_names_presets(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a preset; presets are: tiny"):
        qwen3_vl.from_pretrained(tmp_path / "nowhere")


def test_failed_load_leaves_the_model_untouched(ours_tiny):
    before = {k: v.clone() for k, v in hf_state_dict(ours_tiny).items()}
    broken = {k: torch.zeros_like(v) for k, v in before.items()}
    broken["model.language_model.norm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError):
        load_hf_state_dict(ours_tiny, broken)
    after = hf_state_dict(ours_tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch, ours_tiny):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        qwen3_vl.save_pretrained(ours_tiny, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_load_state_dict_from_hf_method_round_trips_and_refuses_bad_keys(tiny_checkpoint):
    """The model's own method: HF-layout weights in, bitwise the same model out; a bad dict changes nothing."""
    source = qwen3_vl.from_pretrained(tiny_checkpoint)
    target = qwen3_vl.build(qwen3_vl.PRESETS["tiny"], None, seed=99)
    before = {k: v.clone() for k, v in hf_state_dict(target).items()}
    broken = dict(hf_state_dict(source))
    broken.pop(next(iter(broken)))
    with pytest.raises(CheckpointError, match="missing"):
        target.load_state_dict_from_hf(broken)
    assert all(torch.equal(before[k], v) for k, v in hf_state_dict(target).items())  # nothing half-loaded
    target.load_state_dict_from_hf(hf_state_dict(source))
    assert all(torch.equal(hf_state_dict(source)[k], v) for k, v in hf_state_dict(target).items())
