"""``python -m qwen3_vl generate``: text prompts with images / videos on presets and checkpoints,
the ``--prompt-ids`` path, and one-line errors with exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import qwen3_vl
from qwen3_vl.__main__ import main
from qwen3_vl.processing import Processor
from qwen3_vl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    path = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(path / "a.png")
    frames = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(5)]
    frames[0].save(path / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    np.save(path / "clip.npy", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    (path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_preset_text_prompt_with_image_and_video_prints_text(capsys, media):
    code, out, err = run(capsys, "--preset", "tiny", "--prompt", "Describe.", "--image", str(media / "a.png"),
                         "--video", str(media / "clip.gif"), "--max-new-tokens", "4")
    assert code == 0
    assert "byte-level fallback tokenizer (not Qwen's vocabulary)" in err
    # The same request through the library gives the same text (greedy is deterministic).
    processor = Processor.from_pretrained("tiny")
    from qwen3_vl.processing import load_video

    inputs = processor(messages=[{"role": "user", "content": [
        {"type": "image", "image": media / "a.png"}, {"type": "video", "video": load_video(media / "clip.gif")},
        {"type": "text", "text": "Describe."}]}])
    assert inputs["image_grid_thw"] is not None and inputs["video_grid_thw"] is not None
    ids = qwen3_vl.from_pretrained("tiny").generate(**inputs, max_new_tokens=4)
    expected = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
    assert out == expected + "\n"


def test_prompt_ids_path_prints_ids(capsys):
    code, out, _ = run(capsys, "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "3")
    assert code == 0
    ids = qwen3_vl.from_pretrained("tiny").generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert out.split() == [str(t) for t in ids[0, 3:].tolist()]


def test_checkpoint_with_and_without_tokenizer(capsys, tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    code, _, err = run(capsys, "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and err.strip().count("\n") == 0 and "has no tokenizer.json" in err
    code, out, _ = run(capsys, "--model", str(ckpt), "--prompt-ids", "5,6", "--max-new-tokens", "2")
    assert code == 0 and len(out.split()) == 2 and all(t.isdigit() for t in out.split())
    Tokenizer.byte_fallback().save(ckpt)
    code, out, err = run(capsys, "--model", str(ckpt), "--prompt", "hi", "--image", "/dev/null",
                         "--max-new-tokens", "2")
    assert code == 2 and "/dev/null" in err  # not a regular file
    code, out, err = run(capsys, "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0 and "fallback" not in err
    processor = Processor.from_pretrained(ckpt)
    inputs = processor(messages=[{"role": "user", "content": "hi"}])
    ids = qwen3_vl.from_pretrained(ckpt).generate(**inputs, max_new_tokens=2)[0, inputs["input_ids"].shape[1]:]
    assert out == processor.tokenizer.decode(ids.tolist(), skip_special_tokens=True) + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "x", "--image", "{media}/broken.png"], "broken.png"),
        (["--prompt", "x", "--image", "{media}/missing.png"], "no such file"),
        (["--prompt", "x", "--image", "{media}/a.png", "--max-image-pixels", "100"], "over the limit of 100"),
        (["--prompt", "x", "--min-pixels", "9000", "--max-pixels", "100"], "min_pixels (9000) is larger than"),
        (["--prompt", "x", "--video", "{media}/clip.npy"], "frame rate is unknown"),
        (["--prompt", "x"], "give either --prompt TEXT or --prompt-ids"),  # both given below
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt-ids", "1", "--image", "{media}/a.png"], "--image/--video need --prompt"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, media, args, message):
    args = [a.format(media=media) for a in args]
    if args == ["--prompt", "x"]:
        args += ["--prompt-ids", "1"]
    code, out, err = run(capsys, "--preset", "tiny", *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_npy_video_with_fps_runs(capsys, media):
    code, out, _ = run(capsys, "--preset", "tiny", "--prompt", "x", "--video", str(media / "clip.npy"),
                       "--video-fps", "3", "--max-new-tokens", "2")
    assert code == 0 and out.strip()


def test_module_entry_point(media):
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3_vl", "generate", "--preset", "tiny", "--prompt", "hi", "--image",
         str(media / "broken.png"), "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: image ")
    assert len(proc.stderr.strip().splitlines()) == 1
