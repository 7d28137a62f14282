"""Preprocessing parity with transformers, prompt expansion, model-input conventions and bad input.

Oracles (test-only):

* images: ``Qwen2VLImageProcessorPil`` configured as the released Qwen3-VL preprocessor_config.json
  (patch 16, merge 2, temporal 2, mean = std = 0.5, size 65 536 .. 16 777 216). It runs unchanged;
  we require bit-identical float32 ``pixel_values``.
* videos: ``Qwen3VLVideoProcessor``. It needs torchvision, which cannot be installed next to this
  torch (PyPI's wheel fails with "operator torchvision::nms does not exist"). We run the real
  transformers class and substitute only the three torchvision primitives it calls, with the code
  torchvision runs for them (its ``torchvision/transforms/v2/functional`` sources):
    - ``TorchvisionBackend.resize`` -> ``resize_image``: unchanged size returns the input; otherwise
      ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=True)``
      directly on the uint8 tensor (torchvision's CPU path for bicubic is native uint8; see
      ``_do_native_uint8_resize_on_cpu``);
    - ``TorchvisionBackend.normalize`` -> ``normalize_image``: ``image.sub(mean).div_(std)``;
    - ``BaseVideoProcessor.convert_to_rgb`` -> identity (``grayscale_to_rgb`` and
      ``convert_to_rgb`` are no-ops on 3-channel uint8 input, the only kind used here).
  Everything else is transformers' own code: frame sampling, the video smart_resize budget and the
  per-frame cap, fused rescale/normalise, odd-frame padding, patchify, grids, timestamps, and
  ``Qwen3VLProcessor``'s prompt expansion. What this cannot prove: that torchvision's resize kernel
  equals ``interpolate`` on every build; it proves everything around it. Because our video path
  calls that same ``interpolate``, the resize step itself is shared, not independently checked.
* prompts: ``Qwen3VLProcessor`` built from the tokenizer.json our byte-level fallback writes
  (its sub-processor class check is skipped: it looks up ``BaseVideoProcessor``, which transformers
  hides without torchvision).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import qwen3_vl
from qwen3_vl.config import preset
from qwen3_vl.model.positions import InputError
from qwen3_vl.processing import (
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Processor,
    ProcessorConfig,
    Video,
    frame_timestamps,
    load_image,
    load_video,
    preprocess_images,
    preprocess_videos,
    sample_frame_indices,
    smart_resize,
    smart_resize_video,
)
from qwen3_vl.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

RELEASED_IMAGE_SIZE = {"shortest_edge": 65_536, "longest_edge": 16_777_216}
RELEASED_VIDEO_SIZE = {"shortest_edge": 4_096, "longest_edge": 25_165_824}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The torchvision substitution is a monkeypatch that holds for the whole test, across all examples.
FAST_PATCHED = settings(FAST, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------
# Oracles


def hf_image_processor(min_pixels: int = 65_536, max_pixels: int = 16_777_216):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def _tv_resize(self, image, size, resample=None, antialias=True, **kwargs):
    """torchvision.transforms.v2.functional.resize_image for uint8/float tensors on CPU, bicubic."""
    assert int(resample) == 3, "the Qwen3-VL video processor resizes bicubic"
    *lead, channels, height, width = image.shape
    if (size.height, size.width) == (height, width):
        return image
    flat = image.reshape(-1, channels, height, width)
    out = torch.nn.functional.interpolate(flat, size=[size.height, size.width], mode="bicubic",
                                          align_corners=False, antialias=antialias)
    return out.reshape(*lead, channels, size.height, size.width)


def _tv_normalize(self, image, mean, std, inplace=False, **kwargs):
    """torchvision.transforms.v2.functional.normalize_image."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


@pytest.fixture
def tv_substitute(monkeypatch):
    from transformers import image_processing_backends
    from transformers.video_processing_utils import BaseVideoProcessor

    monkeypatch.setattr(image_processing_backends.TorchvisionBackend, "resize", _tv_resize)
    monkeypatch.setattr(image_processing_backends.TorchvisionBackend, "normalize", _tv_normalize)
    monkeypatch.setattr(BaseVideoProcessor, "convert_to_rgb", lambda self, video: video)


def hf_video_processor(size=None, **kwargs):
    # Import the module directly: the package's lazy loader refuses it without torchvision.
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(size=size or RELEASED_VIDEO_SIZE, **kwargs)


@pytest.fixture
def hf_processor(monkeypatch, tv_substitute, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    file = Tokenizer.byte_fallback().save(tmp_path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token="<|endoftext|>", padding_side="left")
    return Qwen3VLProcessor(image_processor=hf_image_processor(), tokenizer=tokenizer,
                            video_processor=hf_video_processor())


def random_image(rng: np.random.Generator, height: int, width: int, mode: str):
    """Noise plus a gradient (so resampling sees both edges and smooth areas), in the given mode."""
    base = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    base[..., :3] = ((base[..., :3].astype(np.float64) + ramp) / 2).astype(np.uint8)
    if mode == "array-rgb":
        return base[..., :3].copy()
    if mode == "array-rgba":
        return base
    image = Image.fromarray(base, mode="RGBA")
    return image if mode == "RGBA" else image.convert(mode)


# ---------------------------------------------------------------------------------------------
# Images


@FAST
@given(
    height=st.integers(1, 700),
    width=st.integers(1, 700),
    factor=st.sampled_from([28, 32]),
    bounds=st.sampled_from([(65_536, 16_777_216), (4_096, 200_000), (1_024, 50_000), (100_000, 100_000)]),
)
def test_smart_resize_matches_transformers(height, width, factor, bounds):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    lo, hi = bounds
    try:
        expected = hf_smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=hi)
    except ValueError:
        with pytest.raises(InputError, match="aspect ratio"):
            smart_resize(height, width, factor, lo, hi)
        return
    assert smart_resize(height, width, factor, lo, hi) == expected
    h, w = expected
    assert h % factor == 0 and w % factor == 0


def test_smart_resize_bounds_and_errors():
    assert smart_resize(1000, 1000, 32, 65_536, 300_000) == (544, 544)  # 1000² > max: floor to the budget
    h, w = smart_resize(10, 10, 32, 65_536, 16_777_216)
    assert h * w >= 65_536 and (h, w) == (256, 256)
    with pytest.raises(InputError, match=r"min_pixels \(5000\) is larger than max_pixels \(4000\)"):
        smart_resize(100, 100, 32, 5000, 4000)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(1, 201, 32, 4096, 10**7)
    assert smart_resize(1, 200, 32, 4096, 10**7)  # exactly 200 is allowed, as upstream


@FAST
@given(
    height=st.integers(1, 400),
    width=st.integers(1, 400),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "CMYK", "array-rgb", "array-rgba"]),
    bounds=st.sampled_from([(65_536, 16_777_216), (4_096, 60_000)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_image_pixels_match_transformers_exactly(height, width, mode, bounds, seed):
    if max(height, width) / min(height, width) > 200:
        return
    image = random_image(np.random.default_rng(seed), height, width, mode)
    lo, hi = bounds
    # Our arrays are channels-last by definition; transformers guesses, and guesses wrong for tiny ones.
    layout = {"input_data_format": "channels_last"} if mode.startswith("array") else {}
    expected = hf_image_processor(lo, hi)(images=[image], return_tensors="np", **layout)
    pixels, grid = preprocess_images([image], ProcessorConfig(min_pixels=lo, max_pixels=hi))
    assert grid.tolist() == expected["image_grid_thw"].tolist()
    assert pixels.dtype == torch.float32 and pixels.shape == expected["pixel_values"].shape
    np.testing.assert_array_equal(pixels.numpy(), expected["pixel_values"])  # bit-identical


def test_several_images_concatenate_in_order():
    rng = np.random.default_rng(0)
    images = [random_image(rng, h, w, "RGB") for h, w in ((300, 200), (50, 700), (256, 256))]
    expected = hf_image_processor()(images=images, return_tensors="np")
    pixels, grid = preprocess_images(images, ProcessorConfig())
    assert grid.tolist() == expected["image_grid_thw"].tolist()
    np.testing.assert_array_equal(pixels.numpy(), expected["pixel_values"])
    assert pixels.shape == (int(grid.prod(-1).sum()), 1536)


def test_image_from_file_equals_image_in_memory(tmp_path):
    image = random_image(np.random.default_rng(1), 123, 77, "RGB")
    image.save(tmp_path / "a.png")
    a, _ = preprocess_images([tmp_path / "a.png"], ProcessorConfig())
    b, _ = preprocess_images([image], ProcessorConfig())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_patch_rows_are_in_merge_window_order():
    """A planted layout: pixel value encodes (row, col) of its 16x16 patch; rows must come out
    window by window (2x2 patches each), raster inside the window."""
    cfg = ProcessorConfig(min_pixels=64 * 96, max_pixels=64 * 96)
    # 64x96 -> grid 4x6 patches; after the affine map x -> (x/255 - .5)/.5 we can read the ids back.
    ids = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10
    pixels = np.kron(ids, np.ones((16, 16), dtype=np.uint8))
    rows, grid = preprocess_images([np.repeat(pixels[..., None], 3, axis=-1)], cfg)
    assert grid.tolist() == [[1, 4, 6]]
    got = np.rint(((rows[:, 0].numpy() * 0.5) + 0.5) * 255).astype(int) // 10
    windows = [(wr, wc) for wr in range(2) for wc in range(3)]
    expected = [(2 * wr + r) * 6 + (2 * wc + c) for wr, wc in windows for r in range(2) for c in range(2)]
    assert got.tolist() == expected
    # Each row holds (channel, time, 16, 16); the two time slices of a still image are equal.
    per = rows.reshape(-1, 3, 2, 16, 16)
    torch.testing.assert_close(per[:, :, 0], per[:, :, 1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Videos


@FAST
@given(total=st.integers(1, 2000), fps=st.sampled_from([1.0, 2.0, 2.5, 4.0, 24.0, 29.97, 30.0, 60.0]))
def test_frame_sampling_matches_transformers(total, fps):
    from transformers.video_utils import VideoMetadata

    oracle = hf_video_processor()
    expected = oracle.sample_frames(VideoMetadata(total_num_frames=total, fps=fps))
    got = sample_frame_indices(total, fps, ProcessorConfig())
    np.testing.assert_array_equal(got, expected)
    assert min(4, total) <= len(got) <= 768


@FAST
@given(
    frames=st.integers(2, 800),
    height=st.integers(1, 2000),
    width=st.integers(1, 2000),
    bounds=st.sampled_from([(4_096, 25_165_824), (131_072, 786_432), (4_096, 100_000)]),
)
def test_video_smart_resize_matches_transformers(frames, height, width, bounds):
    import transformers.models.qwen3_vl.video_processing_qwen3_vl as hf_video

    lo, hi = bounds
    try:
        expected = hf_video.smart_resize(frames, height, width, 2, 32, lo, hi)
    except ValueError:
        with pytest.raises(InputError):
            smart_resize_video(frames, height, width, 2, 32, lo, hi)
        return
    assert smart_resize_video(frames, height, width, 2, 32, lo, hi) == expected


def _hf_video(oracle, frames: np.ndarray, fps: float, **kwargs):
    out = oracle(videos=[frames], video_metadata=[{"fps": fps, "total_num_frames": len(frames)}],
                 return_metadata=True, return_tensors="pt", **kwargs)
    return out["pixel_values_videos"], out["video_grid_thw"], out["video_metadata"][0]


@FAST_PATCHED
@given(
    total=st.integers(2, 40),
    fps=st.sampled_from([1.0, 2.0, 3.0, 4.0, 7.5, 24.0]),
    height=st.integers(8, 120),
    width=st.integers(8, 120),
    size=st.sampled_from([RELEASED_VIDEO_SIZE, {"shortest_edge": 4_096, "longest_edge": 60_000}]),
    cap=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_video_pixels_match_transformers_exactly(tv_substitute, total, fps, height, width, size, cap, seed):
    if max(height, width) / min(height, width) > 200:
        return
    frames = np.random.default_rng(seed).integers(0, 256, (total, height, width, 3), dtype=np.uint8)
    expected, expected_grid, metadata = _hf_video(hf_video_processor(size), frames, fps, cap_pixels_per_frame=cap)
    cfg = ProcessorConfig(video_min_pixels=size["shortest_edge"], video_max_pixels=size["longest_edge"],
                          cap_pixels_per_frame=cap)
    try:
        pixels, grid, stamps = preprocess_videos([Video(frames, fps)], cfg)
    except InputError:
        assert len(metadata.frames_indices) < 2  # only the 1-sampled-frame case fails (it fails upstream too)
        return
    assert grid.tolist() == expected_grid.tolist()
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)  # bit-identical
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    assert stamps[0] == Qwen3VLProcessor._calculate_timestamps(None, metadata.frames_indices, fps, 2)


def test_video_normalisation_is_the_fused_one(tv_substitute):
    """Planted fault: the image path's rounding (x/255 in float64, then (x-.5)/.5) differs from the video
    oracle in the last bit on most values, so the exact comparison above would catch a mixed-up path."""
    frames = np.random.default_rng(4).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)  # no resize needed
    expected, _, _ = _hf_video(hf_video_processor(), frames, 2.0)
    ours, _, _ = preprocess_videos([Video(frames, 2.0)], ProcessorConfig())
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    image_style = ((x.double() * (1 / 255)).float() - 0.5) / 0.5
    fused = (x.float() - 127.5) / 127.5
    assert (image_style != fused).float().mean() > 0.3


def test_one_frame_video_is_refused_like_upstream(tv_substitute):
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="temporal_factor"):
        _hf_video(hf_video_processor(), frames, 1.0)
    with pytest.raises(InputError, match="at least 2 frames"):
        preprocess_videos([Video(frames, 1.0)], ProcessorConfig())


def test_odd_frame_count_repeats_last_frame_and_timestamps_average_pairs():
    frames = np.stack([np.full((64, 64, 3), 40 * i, np.uint8) for i in range(5)])  # 5 frames @ 2 fps: all kept
    pixels, grid, stamps = preprocess_videos([Video(frames, 2.0)], ProcessorConfig())
    assert grid.tolist() == [[3, 4, 4]]
    per = pixels.reshape(3, 16, 3, 2, 16, 16)  # (t, rows per frame, C, time, p, p)
    value = lambda i: (40 * i / 255 - 0.5) / 0.5
    assert torch.allclose(per[2, :, :, 0], torch.tensor(value(4)), atol=1e-6)  # last pair: frame 4 twice
    assert torch.allclose(per[2, :, :, 1], torch.tensor(value(4)), atol=1e-6)
    assert stamps == [[0.25, 1.25, 2.0]]  # (0+.5)/2, (1+1.5)/2, (2+2)/2
    assert frame_timestamps([0, 3, 5, 8], 4.0) == [0.375, 1.625]


def test_video_inputs_list_of_frames_and_animated_gif(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (6, 40, 56, 3), dtype=np.uint8)
    from_list = load_video([Image.fromarray(f) for f in frames], fps=5.0)
    np.testing.assert_array_equal(from_list.frames, frames)
    gif = tmp_path / "clip.gif"
    pil = [Image.fromarray(f).convert("P") for f in frames]
    pil[0].save(gif, save_all=True, append_images=pil[1:], duration=200, loop=0)
    video = load_video(gif)
    assert video.fps == pytest.approx(5.0) and video.frames.shape == (6, 40, 56, 3)
    np.save(tmp_path / "clip.npy", frames)
    assert load_video(tmp_path / "clip.npy", fps=5.0).frames.shape == (6, 40, 56, 3)
    with pytest.raises(InputError, match="frame rate is unknown"):
        load_video(tmp_path / "clip.npy")


# ---------------------------------------------------------------------------------------------
# Prompts: against Qwen3VLProcessor


def _ours(**overrides) -> Processor:
    return Processor(Tokenizer.byte_fallback(), ProcessorConfig(), preset("tiny"), **overrides)


def test_image_prompts_match_transformers_processor(hf_processor):
    rng = np.random.default_rng(5)
    images = [random_image(rng, h, w, "RGB") for h, w in ((200, 330), (90, 40), (512, 300))]
    texts = [
        f"<|im_start|>user\n{VISION_START}{IMAGE_PAD}{VISION_END}What is this?<|im_end|>\n<|im_start|>assistant\n",
        f"Two: {VISION_START}{IMAGE_PAD}{VISION_END} and {VISION_START}{IMAGE_PAD}{VISION_END}, done",
    ]
    expected = hf_processor(text=texts, images=images, padding=True, return_tensors="pt")
    ours = _ours()(text=texts, images=images)
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.equal(ours["attention_mask"], expected["attention_mask"])
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert ours["attention_mask"][1].all() and not ours["attention_mask"][0].all()  # left padding


def test_video_prompts_match_transformers_processor(hf_processor):
    frames = np.random.default_rng(6).integers(0, 256, (9, 60, 90, 3), dtype=np.uint8)
    text = f"<|im_start|>user\nA{VISION_START}{VIDEO_PAD}{VISION_END}B<|im_end|>\n"
    expected = hf_processor(text=[text], videos=[frames], padding=True, return_tensors="pt",
                            videos_kwargs={"video_metadata": [{"fps": 4.0, "total_num_frames": 9}],
                                           "cap_pixels_per_frame": False})
    # transformers 5.0-5.24 keep the template's outer <|vision_start|>..<|vision_end|> around the timestamped
    # frames (keep_outer_video_wrapper reproduces that layout exactly); 5.25 replaces the whole triple again,
    # as 4.57 and the spec do (our default).
    from packaging.version import Version
    from transformers import __version__ as hf_version

    wrapped = _ours(keep_outer_video_wrapper=True)(text=text, videos=[Video(frames, 4.0)])
    ours = _ours()(text=text, videos=[Video(frames, 4.0)])
    same_layout = wrapped if Version("5.0") <= Version(hf_version) < Version("5.25") else ours
    assert torch.equal(same_layout["input_ids"], expected["input_ids"])
    assert torch.equal(same_layout["video_grid_thw"], expected["video_grid_thw"])
    torch.testing.assert_close(same_layout["pixel_values_videos"], expected["pixel_values_videos"], rtol=0, atol=0)
    # The two layouts differ by exactly that outer pair.
    tokenizer = Tokenizer.byte_fallback()
    got = tokenizer.decode(ours["input_ids"][0].tolist())
    want = tokenizer.decode(wrapped["input_ids"][0].tolist())
    assert got == want.replace(VISION_START + "<", "<", 1).replace(VISION_END * 2, VISION_END, 1)
    assert got.count("seconds>") == int(ours["video_grid_thw"][0, 0]) == 2
    assert f"A<0.4 seconds>{VISION_START}{VIDEO_PAD}" in got and f"{VISION_END}<1.6 seconds>{VISION_START}" in got


def test_chat_messages_with_media_items():
    image = random_image(np.random.default_rng(7), 64, 64, "RGB")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]},
    ]
    out = _ours()(messages=messages)
    text = Tokenizer.byte_fallback().decode(out["input_ids"][0].tolist())
    n = int(out["image_grid_thw"].prod()) // 4
    assert text == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{VISION_START}"
                    f"{IMAGE_PAD * n}{VISION_END}Hi<|im_end|>\n<|im_start|>assistant\n")
    same = _ours()(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                   images=[image])
    assert torch.equal(same["pixel_values"], out["pixel_values"])
    with pytest.raises(InputError, match="both inside the messages"):
        _ours()(messages=messages, images=[image])


# ---------------------------------------------------------------------------------------------
# Model-input conventions


@pytest.fixture(scope="module")
def tiny_model():
    return qwen3_vl.from_pretrained("tiny", seed=3)


def test_processor_output_feeds_model_and_left_padding_is_consistent(tiny_model):
    rng = np.random.default_rng(8)
    image = random_image(rng, 70, 130, "RGB")
    video = Video(rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8), 3.0)
    long = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": video},
                                         {"type": "text", "text": "Describe both, please."}]}]
    short = [{"role": "user", "content": "Hi"}]
    proc = _ours()
    batch = proc(messages=[short, long])
    assert batch["input_ids"].dtype == torch.int64 and batch["image_grid_thw"].dtype == torch.int64
    assert batch["pixel_values"].shape[1] == tiny_model.config.vision.patch_dim
    logits = tiny_model(**batch)
    assert logits.shape[:2] == batch["input_ids"].shape
    # Each row of the padded batch equals that prompt run alone (at its real positions).
    for row, messages in ((0, short), (1, long)):
        alone = proc(messages=messages)
        ref = tiny_model(**alone)
        real = batch["attention_mask"][row].bool()
        torch.testing.assert_close(logits[row, real], ref[0], rtol=1e-5, atol=1e-5)
    out = tiny_model.generate(**batch, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


# ---------------------------------------------------------------------------------------------
# Bad input


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_zero_size_images_are_refused(tmp_path):
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(InputError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"junk.png (is not a readable image|is corrupt or truncated)"):
        load_image(tmp_path / "junk.png")
    rng = np.random.default_rng(9)
    for fmt in ("PNG", "JPEG"):
        data = _png_bytes(random_image(rng, 200, 200, "RGB"), fmt)
        file = tmp_path / f"cut.{fmt.lower()}"
        file.write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError, match="corrupt or truncated"):
            load_image(file)
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_unsupported_modes_and_arrays_are_refused():
    with pytest.raises(InputError, match="unsupported pixel mode 'F'"):
        load_image(Image.new("F", (8, 8)))
    with pytest.raises(InputError, match="unsupported pixel mode 'I;16'"):
        load_image(Image.new("I;16", (8, 8)))
    with pytest.raises(InputError, match="must be uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="channels last"):
        load_image(np.zeros((3, 8, 8, 2), np.uint8))
    with pytest.raises(InputError, match="file path, a PIL image or a uint8 numpy array"):
        load_image(torch.zeros(8, 8, 3))


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("1", (10_000, 9_000)).save(big)  # 90 M pixels, a few KB on disk
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(InputError, match=r"10000x9000 = 90,000,000 pixels, over the limit of 89,478,485"):
        load_image(big)
    assert decoded == []  # the header alone was enough
    with pytest.raises(InputError, match="over the limit of 1,000"):
        preprocess_images([random_image(np.random.default_rng(0), 40, 40, "RGB")],
                          ProcessorConfig(max_image_pixels=1_000))
    huge = tmp_path / "huge.png"
    Image.new("1", (20_000, 10_000)).save(huge)  # over PIL's own hard limit too
    with pytest.raises(InputError, match=r"huge\.png"):
        load_image(huge, max_image_pixels=10**9)
    assert decoded == []


def test_min_pixels_over_max_pixels_is_refused():
    with pytest.raises(InputError, match=r"min_pixels \(100000\) is larger than max_pixels \(5000\)"):
        ProcessorConfig().with_(min_pixels=100_000, max_pixels=5_000)
    with pytest.raises(InputError, match="video min_pixels"):
        ProcessorConfig(video_min_pixels=10, video_max_pixels=5).validate()
    with pytest.raises(InputError, match="min_pixels"):
        Processor.from_pretrained("tiny", min_pixels=100_000, max_pixels=5_000)


def test_video_with_zero_frames_is_refused():
    with pytest.raises(InputError, match="zero frames"):
        load_video(np.zeros((0, 32, 32, 3), np.uint8), fps=2.0)
    with pytest.raises(InputError, match="zero frames"):
        load_video([], fps=2.0)
    with pytest.raises(InputError, match="zero frames"):
        sample_frame_indices(0, 2.0, ProcessorConfig())
    with pytest.raises(InputError, match="fps must be a positive number"):
        load_video(np.zeros((4, 32, 32, 3), np.uint8), fps=0.0)
    with pytest.raises(InputError, match="frames differ in size"):
        load_video([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], fps=1.0)


def test_placeholder_and_media_counts_must_agree():
    image = random_image(np.random.default_rng(10), 64, 64, "RGB")
    with pytest.raises(InputError, match="2 image placeholder"):
        _ours()(text=f"{IMAGE_PAD} and {IMAGE_PAD}", images=[image])
    with pytest.raises(InputError, match="0 video placeholder"):
        _ours()(text="no video", videos=[Video(np.zeros((4, 32, 32, 3), np.uint8), 2.0)])


def test_image_token_count_not_matching_grid_is_refused_by_the_model(tiny_model):
    image = random_image(np.random.default_rng(11), 64, 64, "RGB")
    inputs = _ours()(text=f"look {IMAGE_PAD} here", images=[image])
    tiny_model(**inputs)  # the processor's own output is consistent
    image_id = tiny_model.config.image_token_id
    ids = inputs["input_ids"]
    first = int((ids[0] == image_id).nonzero()[0, 0])
    mismatch = r"image token count does not match the image grid|does not match the image grid"
    extra = torch.cat([ids[:, :first], torch.tensor([[image_id]]), ids[:, first:]], 1)
    fewer = torch.cat([ids[:, :first], ids[:, first + 1 :]], 1)
    for bad in (extra, fewer):
        with pytest.raises(InputError, match=mismatch):
            tiny_model(**dict(inputs, input_ids=bad, attention_mask=None))
        with pytest.raises(InputError, match=mismatch):
            tiny_model.generate(**dict(inputs, input_ids=bad, attention_mask=None), max_new_tokens=1)
    with pytest.raises(InputError, match=r"the grid needs \[512, 1536\]"):
        tiny_model(**dict(inputs, image_grid_thw=inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])))


def test_prompt_longer_than_context_is_refused():
    small = preset("tiny")
    small = small.replace(text=type(small.text)(**{**small.text.__dict__, "max_position_embeddings": 64}))
    proc = Processor(Tokenizer.byte_fallback(), ProcessorConfig(), small)
    proc(text="x" * 64)
    with pytest.raises(InputError, match=r"prompt of 65 tokens is longer than the context \(64 tokens\)"):
        proc(text="x" * 65)
    image = random_image(np.random.default_rng(12), 64, 64, "RGB")  # 64 image tokens + 2 more
    with pytest.raises(InputError, match="longer than the context"):
        proc(text=f"a{IMAGE_PAD}b", images=[image])
    model = qwen3_vl.build(small, None)
    with pytest.raises(InputError, match="longer than the context"):
        model(torch.zeros(1, 65, dtype=torch.int64))
    with pytest.raises(InputError, match="exceeds the context"):
        model.generate(**proc(text="x" * 60), max_new_tokens=5)


def test_processor_from_pretrained_checks_tokenizer_ids(tmp_path, tiny_checkpoint):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    from qwen3_vl.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Processor.from_pretrained(ckpt)
    Tokenizer.byte_fallback().save(ckpt)
    proc = Processor.from_pretrained(ckpt)
    assert proc.context_length == qwen3_vl.from_pretrained("tiny").config.text.max_position_embeddings
    with pytest.raises(qwen3_vl.ConfigError, match="neither a checkpoint directory nor a preset"):
        Processor.from_pretrained(tmp_path / "nope")
    # A tokenizer whose image pad id disagrees with config.json is refused.
    bad = preset("tiny").replace(image_token_id=151_000)
    with pytest.raises(TokenizerError, match=r"<\|image_pad\|> id 151655, the model expects 151000"):
        Processor(Tokenizer.byte_fallback(), None, bad)


def test_processor_refuses_geometry_that_disagrees_with_the_model():
    with pytest.raises(qwen3_vl.ConfigError, match="patch/merge/temporal sizes 14/2/2 do not match the model's 16/2/2"):
        Processor(Tokenizer.byte_fallback(), ProcessorConfig(patch_size=14), preset("tiny"))
    with pytest.raises(InputError, match="messages is empty"):
        _ours()(messages=[])
    with pytest.raises(InputError, match="exactly one of text or messages"):
        _ours()()


def test_preprocessor_config_files_are_read(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 4096, "longest_edge": 1_000_000}, "patch_size": 16, "image_mean": [0.5] * 3}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 8192, "longest_edge": 2_000_000}, "fps": 1, "max_frames": 64}))
    cfg = ProcessorConfig.from_dir(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.video_min_pixels, cfg.video_max_pixels) == (
        4096, 1_000_000, 8192, 2_000_000)
    assert cfg.fps == 1 and cfg.max_frames == 64 and cfg.image_mean == (0.5, 0.5, 0.5)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    with pytest.raises(qwen3_vl.ConfigError, match="do_normalize=false is not supported"):
        ProcessorConfig.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 9, "max_pixels": 4}))
    with pytest.raises(qwen3_vl.ConfigError, match="min_pixels"):
        ProcessorConfig.from_dir(tmp_path)


def test_token_counts_follow_the_grid():
    """h*w/4 tokens per image and per video frame pair, for the spec's worked sizes."""
    image = random_image(np.random.default_rng(13), 480, 640, "RGB")
    out = _ours()(text=f"{IMAGE_PAD}", images=[image])
    (t, h, w), = out["image_grid_thw"].tolist()
    assert (t, h, w) == (1, 30, 40) and int((out["input_ids"] == 151655).sum()) == h * w // 4 == 300
    assert math.prod(smart_resize(480, 640)) // 1024 == 300
