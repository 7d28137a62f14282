"""Tokenizer: tokenizer.json loading (same ids as transformers' fast tokenizer on the same file), the
byte-level fallback for presets, and the minimal chat template."""

from __future__ import annotations

import json
import re

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_vl.model.positions import InputError
from qwen3_vl.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    _bytes_to_unicode,
    apply_chat_template,
)

FAST = settings(max_examples=50, deadline=None)
SPECIALS = st.sampled_from(list(SPECIAL_TOKENS))
TEXT = st.lists(st.one_of(st.text(max_size=20), SPECIALS), max_size=8).map("".join)


@pytest.fixture(scope="module")
def fallback() -> Tokenizer:
    return Tokenizer.byte_fallback()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A checkpoint-style directory with a small trained byte-level BPE (real merges) and a tokenizer_config."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld, ünïcode text", "numbers 12345 67890"] * 20
    backend.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe")
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"},
        "added_tokens_decoder": {str(backend.token_to_id(t)): {"content": t, "special": True}
                                 for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")},
    }))
    return path


def test_fallback_alphabet_is_byte_level_bpe():
    assert set(_bytes_to_unicode().values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def test_fallback_special_tokens_sit_at_qwen_ids(fallback):
    for token, token_id in SPECIAL_TOKENS.items():
        assert fallback.token_to_id(token) == token_id
        assert fallback.encode(token) == [token_id]
    assert fallback.encode("Az\n") == [65, 122, 10]
    assert fallback.encode("é") == list("é".encode())
    assert (fallback.eos_token_id, fallback.pad_token_id) == (151645, 151643)


@FAST
@given(text=TEXT)
def test_fallback_round_trips_any_text(fallback, text):
    ids = fallback.encode(text)
    assert all(i < 256 or i in SPECIAL_TOKENS.values() for i in ids)
    assert fallback.decode(ids) == text
    assert len(ids) == len(text.encode()) - sum(text.count(t) * (len(t) - 1) for t in SPECIAL_TOKENS)


def test_fallback_marks_ids_it_cannot_spell(fallback):
    assert fallback.decode([104, 105, 5000, 151645, 33]) == "hi[#5000]<|im_end|>!"
    assert fallback.decode([104, 151645, 33], skip_special_tokens=True) == "h!"


@FAST
@given(text=TEXT)
def test_checkpoint_tokenizer_matches_transformers(bpe_dir, text):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.from_dir(bpe_dir)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"))
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_from_dir_reads_config_and_refuses_bad_files(bpe_dir, tmp_path):
    tok = Tokenizer.from_dir(bpe_dir)
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") and tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert Tokenizer.from_dir(tmp_path) is None  # no tokenizer.json: the caller decides (ids only)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"not a valid tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((bpe_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"151645": {"content": "<|im_end|>", "special": True}}}))
    with pytest.raises(TokenizerError, match=re.escape("gives '<|im_end|>' id 151645")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|no_such|>"}))
    with pytest.raises(TokenizerError, match=re.escape("has no token '<|no_such|>'")):
        Tokenizer.from_dir(tmp_path)


def test_saved_fallback_loads_back_identically(fallback, tmp_path):
    fallback.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    text = "<|im_start|>user\nhé<|image_pad|><|im_end|>"
    assert loaded.encode(text) == fallback.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


def test_chat_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}, {"video": "v.gif"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And now?"},
    ]
    assert apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ({"role": "user", "content": "x"}, "non-empty list"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "system message may only come first"),
        ([{"role": "assistant", "content": [{"type": "image"}]}], "only user messages may hold images"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "neither text, image nor video"),
        ([{"role": "user"}], "'role' and 'content'"),
    ],
)
def test_chat_template_refuses_malformed_messages(messages, error):
    with pytest.raises(InputError, match=re.escape(error)):
        apply_chat_template(messages)
