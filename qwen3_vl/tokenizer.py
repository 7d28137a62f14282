"""Tokenizers: a checkpoint's ``tokenizer.json`` (through the ``tokenizers`` package), Qwen's chat
template in its minimal form, and a byte-level fallback for presets.

The fallback is NOT Qwen's vocabulary. It maps the bytes 0..255 to the ids 0..255 and puts the Qwen
special tokens at their real ids (151643..151656), so prompts with image and video placeholders work
on presets end to end. Text it produces means nothing to a real Qwen checkpoint, and a preset's
random weights produce ids the fallback cannot spell; those decode as ``[#id]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from qwen3_vl.model.positions import InputError


class TokenizerError(ValueError):
    """A tokenizer.json / tokenizer_config.json that cannot be used."""


# Qwen2/2.5/3 special tokens and their ids (the architecture spec, section 5).
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


class Tokenizer:
    """Text <-> ids. ``encode`` and ``decode`` behave like transformers' fast tokenizer on the same file."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str = "<|im_end|>",
        pad_token: str = "<|endoftext|>",
        name: str = "tokenizer.json",
        mark_unknown: bool = False,
    ) -> None:
        self.backend = backend
        self.name = name
        self.mark_unknown = mark_unknown
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None when it has no ``tokenizer.json``.

        ``tokenizer_config.json`` (optional) supplies the eos and pad tokens; its ``added_tokens_decoder``
        must agree with ``tokenizer.json``.
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"{file} is not a valid tokenizer.json: {exc}") from None
        settings = _read_json(path / "tokenizer_config.json")
        for token_id, entry in (settings.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content is not None and backend.token_to_id(content) != int(token_id):
                raise TokenizerError(
                    f"tokenizer_config.json gives {content!r} id {token_id}, but tokenizer.json has "
                    f"{backend.token_to_id(content)}"
                )
        eos = _token_text(settings.get("eos_token")) or "<|im_end|>"
        pad = _token_text(settings.get("pad_token")) or "<|endoftext|>"
        return cls(backend, eos_token=eos, pad_token=pad, name=str(file))

    @classmethod
    def byte_fallback(cls) -> Tokenizer:
        """Bytes as ids 0..255 plus the Qwen special tokens at their real ids. NOT Qwen's vocabulary."""
        byte_chars = _bytes_to_unicode()
        vocab = {byte_chars[b]: b for b in range(256)}
        vocab.update(SPECIAL_TOKENS)
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
        # No regex split and no merges: every byte is its own token.
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return cls(backend, name="byte-level fallback (not Qwen's vocabulary)", mark_unknown=True)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.name} has no token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        return self.backend.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise InputError(f"text must be a string, got {type(text).__name__}")
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if not self.mark_unknown:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # The fallback cannot spell most ids; show them instead of dropping them silently.
        parts, run = [], []
        for i in [*ids, None]:
            if i is not None and self.backend.id_to_token(i) is not None:
                run.append(i)
                continue
            if run:
                parts.append(self.backend.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if i is not None:
                parts.append(f"[#{i}]")
        return "".join(parts)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` into the directory ``path`` (e.g. to hand the fallback to other tools)."""
        file = Path(path) / "tokenizer.json"
        self.backend.save(str(file))
        return file


def apply_chat_template(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Qwen's chat format, minimal: system / user / assistant turns, images and videos as placeholders.

    ``messages``: ``[{"role": "user", "content": "text" | [{"type": "image"}, {"type": "text", "text": ...}]}]``;
    an item may also carry the media (``{"image": ...}``, ``{"video": ...}``). No default system prompt
    (Qwen3-VL's template adds none); no tools or thinking blocks.
    """
    if isinstance(messages, dict) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            raise InputError(f"message {i} has role {role!r}; supported roles are system, user, assistant")
        if role == "system" and i != 0:
            raise InputError("a system message may only come first")
        out.append(f"<|im_start|>{role}\n{_content_text(message['content'], role, i)}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def content_kind(item: Any) -> str:
    """'image', 'video' or 'text' for one content item of a message."""
    if not isinstance(item, dict):
        raise InputError(f"content items must be dicts like {{'type': 'text', 'text': ...}}, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "image" or "image" in item or "image_url" in item:
        return "image"
    if kind == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    raise InputError(f"content item {item!r} is neither text, image nor video")


def _content_text(content: Any, role: str, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise InputError(f"message {index} content must be a string or a list of items")
    parts = []
    for item in content:
        kind = content_kind(item)
        if kind != "text" and role != "user":
            raise InputError(f"message {index}: only user messages may hold images or videos")
        parts.append({"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}.get(kind) or str(item["text"]))
    return "".join(parts)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{file} is not valid JSON: {exc}") from None


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE (and of Qwen's tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
