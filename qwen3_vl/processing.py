"""Preprocessing: images and videos to the patch rows the vision encoder reads, and prompts with their
vision placeholders expanded. Plain numpy / PIL / torch; transformers is only the test oracle.

Images reproduce transformers' ``Qwen2VLImageProcessorPil`` float for float: RGB (alpha composited
on white), ``smart_resize`` to multiples of 32, PIL bicubic resize, ``x * (1/255)`` in float64 cast
to float32, ``(x - 0.5) / 0.5`` in float32, two identical frames, patch rows in merge-window order.

Videos reproduce ``Qwen3VLVideoProcessor``: frames sampled at 2 fps (4..768 frames, indices
``round(linspace)``), one ``smart_resize`` budgeted over all frames, bicubic antialiased resize of
uint8 tensors (what torchvision's resize runs on CPU: ``torch.nn.functional.interpolate``), the
fused ``(x - 127.5) / 127.5`` normalisation, an odd frame count padded with the last frame, and
one timestamp per 2-frame temporal patch. The two oracles round differently in the last bit
(rescale-then-normalise vs fused), so each path mirrors its own.

Prompt expansion: each ``<|image_pad|>`` becomes ``t*h*w/4`` copies; each video
``<|vision_start|><|video_pad|><|vision_end|>`` becomes one ``<{t:.1f} seconds><|vision_start|>
<|video_pad|>*(h*w/4)<|vision_end|>`` group per temporal patch (transformers 4.57 and the spec).
transformers 5.0-5.24 replace only the inner ``<|video_pad|>`` and so keep an outer start/end pair
(``keep_outer_video_wrapper=True`` reproduces that layout); 5.25 replaces the whole triple again.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

from qwen3_vl.config import PRESETS, ConfigError, Qwen3VLConfig, from_hf, preset
from qwen3_vl.model.positions import InputError
from qwen3_vl.tokenizer import Tokenizer, TokenizerError, apply_chat_template, content_kind

# PIL's own warning level (Image.MAX_IMAGE_PIXELS); PIL itself refuses twice that at open.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
RESCALE_FACTOR = 1 / 255

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class ProcessorConfig:
    """Preprocessing settings. Defaults are the released Qwen3-VL ``preprocessor_config.json``
    (size 65 536 .. 16 777 216 pixels) and ``video_preprocessor_config.json`` (4 096 .. 25 165 824
    pixels over all sampled frames, fps 2, 4..768 frames)."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 65_536
    max_pixels: int = 16_777_216
    video_min_pixels: int = 4_096
    video_max_pixels: int = 25_165_824
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False  # transformers' opt-in qwen-vl-utils style per-frame cap
    max_video_tokens: int = 768
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decompression-bomb guard on the source image

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def validate(self) -> ProcessorConfig:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "video_min_pixels",
                     "min_frames", "max_video_tokens", "max_image_pixels"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise InputError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.video_min_pixels > self.video_max_pixels:
            raise InputError(
                f"video min_pixels ({self.video_min_pixels}) is larger than video max_pixels ({self.video_max_pixels})"
            )
        if self.min_frames > self.max_frames:
            raise InputError(f"min_frames ({self.min_frames}) is larger than max_frames ({self.max_frames})")
        if not self.fps > 0:
            raise InputError(f"fps must be > 0, got {self.fps}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise InputError("image_mean and image_std need 3 values each, std > 0")
        return self

    def with_(self, **changes: Any) -> ProcessorConfig:
        """A copy with ``changes`` applied (None values ignored), validated."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()

    @classmethod
    def from_dir(cls, path: str | Path) -> ProcessorConfig:
        """Read ``preprocessor_config.json`` / ``video_preprocessor_config.json`` where present."""
        path = Path(path)
        changes: dict[str, Any] = {}
        for file, prefix in (("preprocessor_config.json", ""), ("video_preprocessor_config.json", "video_")):
            settings = _read_json(path / file)
            if not settings:
                continue
            for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
                if settings.get(flag) is False:
                    raise ConfigError(f"{file}: {flag}=false is not supported")
            if settings.get("resample", 3) != 3:
                raise ConfigError(f"{file}: only bicubic resampling (3) is supported, got {settings['resample']}")
            if abs(settings.get("rescale_factor", RESCALE_FACTOR) - RESCALE_FACTOR) > 1e-12:
                raise ConfigError(f"{file}: only rescale_factor 1/255 is supported")
            size = settings.get("size") or {}
            lo = size.get("shortest_edge", settings.get("min_pixels"))
            hi = size.get("longest_edge", settings.get("max_pixels"))
            if lo is not None:
                changes[prefix + "min_pixels"] = int(lo)
            if hi is not None:
                changes[prefix + "max_pixels"] = int(hi)
            names = {f.name for f in fields(cls)}
            for key in ("patch_size", "merge_size", "temporal_patch_size", "fps", "min_frames", "max_frames",
                        "max_video_tokens", "image_mean", "image_std", "cap_pixels_per_frame"):
                if key in settings and key in names and settings[key] is not None:
                    value = settings[key]
                    changes[key] = tuple(value) if isinstance(value, list) else value
        try:
            return replace(cls(), **changes).validate()
        except InputError as exc:
            raise ConfigError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Images


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65_536,
                 max_pixels: int = 16_777_216) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept.

    The transformers (Qwen2-VL image processor) rule, including Python's round-half-even.
    """
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    if height < 1 or width < 1:
        raise InputError(f"image has zero size ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} is too extreme (must be at most 200)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise InputError(f"image {width}x{height} resizes to nothing with min_pixels={min_pixels}; raise min_pixels")
    return h_bar, w_bar


_IMAGE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def load_image(source: Any, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, PIL image or uint8 array ``[H, W]`` / ``[H, W, 1|3|4]`` -> an RGB PIL image.

    The pixel count is checked against ``max_image_pixels`` from the header, before any pixel is
    decoded. Transparency is composited onto white, as transformers does.
    """
    if isinstance(source, (str, Path)):
        return _open_image_file(Path(source), max_image_pixels)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_image_pixels, "image")
        _check_mode(source.mode, "image")
        try:
            source.load()
        except Exception as exc:  # lazily opened files decode here
            raise InputError(f"image is corrupt or truncated: {exc}") from None
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_image_pixels)
    raise InputError(f"an image must be a file path, a PIL image or a uint8 numpy array, got {type(source).__name__}")


def _open_image_file(path: Path, max_image_pixels: int) -> Image.Image:
    if not path.is_file():
        raise InputError(f"image {path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"image {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is over PIL's decompression-bomb limit: {exc}") from None
    except UnidentifiedImageError:
        raise InputError(f"image {path} is not a readable image (unknown format or corrupt header)") from None
    except OSError as exc:
        raise InputError(f"image {path} cannot be read: {exc}") from None
    with image:
        _check_pixels(image.size, max_image_pixels, f"image {path}")  # from the header: nothing decoded yet
        _check_mode(image.mode, f"image {path}")
        try:
            image.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken data
            raise InputError(f"image {path} is corrupt or truncated: {exc}") from None
        return _to_rgb(image)


def _check_pixels(size: tuple[int, int], limit: int, what: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{what} has zero size ({width}x{height})")
    if width * height > limit:
        raise InputError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            "(decompression-bomb guard; raise max_image_pixels to allow it)"
        )


def _check_mode(mode: str, what: str) -> None:
    if mode not in _IMAGE_MODES:
        raise InputError(f"{what} has unsupported pixel mode {mode!r} (supported: {', '.join(sorted(_IMAGE_MODES))})")


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb for PIL images."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, limit: int) -> Image.Image:
    """transformers' convert_to_rgb for channels-last uint8 arrays."""
    if array.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 (0..255), got {array.dtype}; convert floats with "
                         "(x * 255).round().astype(np.uint8)")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(f"image arrays must be [H, W] or [H, W, 1|3|4] (channels last), got shape {array.shape}")
    _check_pixels((array.shape[1], array.shape[0]), limit, "image array")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """[T, C, H, W] -> [T/tp * H/p * W/p, C*tp*p*p] rows in merge-window order.

    Row order: temporal patch, then merge window (raster), then the m x m patches inside it; each row
    is flattened (channel, time, row-in-patch, col-in-patch), the Conv3d weight layout.
    """
    t, c, h, w = frames.shape
    gt, gh, gw, m, p = t // temporal_patch_size, h // patch_size, w // patch_size, merge_size, patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * p * p)


def image_patches(image: Image.Image, config: ProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One RGB image -> (patch rows float32 [h*w, 1536], grid (1, h, w))."""
    height, width = smart_resize(image.height, image.width, config.factor, config.min_pixels, config.max_pixels)
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    x = (pixels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    x = (x - np.array(config.image_mean, dtype=np.float32)) / np.array(config.image_std, dtype=np.float32)
    x = x.transpose(2, 0, 1)
    frames = np.broadcast_to(x, (config.temporal_patch_size, *x.shape))  # a still image is two equal frames
    rows = patchify(frames, config.patch_size, config.merge_size, config.temporal_patch_size)
    return rows, (1, height // config.patch_size, width // config.patch_size)


def preprocess_images(images: Sequence[Any], config: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (paths, PIL, uint8 arrays) -> ``pixel_values`` [sum t*h*w, 1536] float32, ``image_grid_thw`` [n, 3]."""
    rows, grids = [], []
    for image in images:
        patches, grid = image_patches(load_image(image, config.max_image_pixels), config)
        rows.append(patches)
        grids.append(grid)
    return torch.from_numpy(np.concatenate(rows)), torch.tensor(grids, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Videos


@dataclass
class Video:
    """Decoded frames ``[T, H, W, 3]`` uint8 and the source frame rate (needed for sampling and timestamps)."""

    frames: np.ndarray
    fps: float


def load_video(source: Any, fps: float | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Video:
    """A ``Video``; an array ``[T, H, W, 3]`` or a list of frames (paths, PIL, arrays) with ``fps``; a
    ``.npy`` file of frames with ``fps``; or an animated GIF / WebP / PNG (fps from its frame durations).

    No video codecs: decode MP4 and friends with your own decoder and pass the frames.
    """
    if isinstance(source, Video):
        frames, fps = source.frames, source.fps
    elif isinstance(source, (str, Path)):
        frames, file_fps = _read_video_file(Path(source), max_image_pixels)
        fps = fps if fps is not None else file_fps
    elif isinstance(source, np.ndarray):
        frames = source
    elif isinstance(source, (list, tuple)):
        frames = [np.asarray(load_image(f, max_image_pixels)) for f in source]
        if frames and len({f.shape for f in frames}) > 1:
            raise InputError(f"video frames differ in size: {sorted({f.shape[:2] for f in frames})}")
        frames = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    else:
        raise InputError(f"a video must be a Video, a [T, H, W, 3] array, a list of frames or a file path, "
                         f"got {type(source).__name__}")
    if fps is None:
        raise InputError("the video's frame rate is unknown; pass fps (frames per second of the source)")
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise InputError(f"video fps must be a positive number, got {fps!r}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"video frames must be [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise InputError(f"video frames must be uint8, got {frames.dtype}")
    if frames.shape[0] == 0:
        raise InputError("video has zero frames")
    _check_pixels((frames.shape[2], frames.shape[1]), max_image_pixels, "video frame")
    return Video(frames, float(fps))


def _read_video_file(path: Path, max_image_pixels: int) -> tuple[np.ndarray, float | None]:
    if path.suffix == ".npy":
        if not path.is_file():
            raise InputError(f"video {path}: no such file")
        try:
            # Memory-mapped: only the sampled frames are ever read.
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        except (ValueError, OSError) as exc:
            raise InputError(f"video {path} is not a readable .npy array: {exc}") from None
    if not path.is_file():
        raise InputError(f"video {path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"video {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
        raise InputError(f"video {path}: only animated GIF/WebP/PNG files and .npy frame arrays can be read "
                         "(no video codecs); decode other formats yourself and pass the frames") from None
    with image:
        _check_pixels(image.size, max_image_pixels, f"video {path}")
        frames, durations = [], []
        try:
            for frame in ImageSequence.Iterator(image):
                frames.append(np.asarray(_to_rgb(frame)))
                durations.append(frame.info.get("duration") or 0)
        except Exception as exc:
            raise InputError(f"video {path} is corrupt or truncated: {exc}") from None
    fps = 1000 / float(np.mean(durations)) if durations and min(durations) > 0 else None
    return np.stack(frames), fps


def sample_frame_indices(total_frames: int, source_fps: float, config: ProcessorConfig) -> np.ndarray:
    """Indices of the frames to keep: ``config.fps`` per second, clamped to [min_frames, max_frames] and
    to the frames there are, spread by ``round(linspace(0, total - 1, n))``."""
    if total_frames < 1:
        raise InputError("video has zero frames")
    n = int(total_frames / source_fps * config.fps)
    n = min(max(n, config.min_frames), config.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int)


def frame_timestamps(indices: Sequence[int], source_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds per temporal patch: the mean time of its first and last frame (index list padded by
    repeating the last index)."""
    idx = [int(i) for i in indices]
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    seconds = [i / source_fps for i in idx]
    step = temporal_patch_size
    return [(seconds[i] + seconds[i + step - 1]) / 2 for i in range(0, len(seconds), step)]


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4_096, max_pixels: int = 25_165_824) -> tuple[int, int]:
    """Per-frame target (height, width) with the pixel budget counted over all frames together
    (transformers' Qwen3-VL video rule)."""
    if min_pixels > max_pixels:
        raise InputError(f"video min_pixels ({min_pixels}) is larger than video max_pixels ({max_pixels})")
    if num_frames < temporal_factor:
        raise InputError(f"a video needs at least {temporal_factor} frames after sampling, got {num_frames} "
                         "(pass a single frame as an image)")
    if height < 1 or width < 1:
        raise InputError(f"video frames have zero size ({width}x{height})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"video aspect ratio {max(height, width) / min(height, width):.1f} is too extreme (must be at most 200)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_patches(video: Video, config: ProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int], list[float]]:
    """One video -> (patch rows float32 [t*h*w, 1536], grid (t, h, w), seconds per temporal patch)."""
    indices = sample_frame_indices(len(video.frames), video.fps, config)
    frames = torch.from_numpy(np.ascontiguousarray(video.frames[indices])).permute(0, 3, 1, 2)
    num_frames, _, height, width = frames.shape
    max_pixels = config.video_max_pixels
    if config.cap_pixels_per_frame:
        frame_cap = config.max_video_tokens * config.factor**2
        per_frame = max(min(frame_cap, config.video_max_pixels // num_frames), int(config.video_min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    new_h, new_w = smart_resize_video(num_frames, height, width, config.temporal_patch_size, config.factor,
                                      config.video_min_pixels, max_pixels)
    if (new_h, new_w) != (height, width):
        # torchvision's resize of a uint8 tensor on CPU is exactly this call (native uint8 bicubic).
        frames = torch.nn.functional.interpolate(frames.contiguous(), size=[new_h, new_w], mode="bicubic",
                                                 align_corners=False, antialias=True)
    # transformers fuses rescale and normalise: (x - mean * 255) / (std * 255), in float32.
    mean = torch.tensor(config.image_mean) * (1.0 / RESCALE_FACTOR)
    std = torch.tensor(config.image_std) * (1.0 / RESCALE_FACTOR)
    x = frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1)).numpy()
    if pad := -num_frames % config.temporal_patch_size:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    rows = patchify(x, config.patch_size, config.merge_size, config.temporal_patch_size)
    grid = (x.shape[0] // config.temporal_patch_size, new_h // config.patch_size, new_w // config.patch_size)
    return rows, grid, frame_timestamps(indices, video.fps, config.temporal_patch_size)


def preprocess_videos(
    videos: Sequence[Any], config: ProcessorConfig
) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Videos -> ``pixel_values_videos`` [sum t*h*w, 1536], ``video_grid_thw`` [n, 3], timestamps per video."""
    rows, grids, stamps = [], [], []
    for video in videos:
        patches, grid, seconds = video_patches(load_video(video, max_image_pixels=config.max_image_pixels), config)
        rows.append(patches)
        grids.append(grid)
        stamps.append(seconds)
    return torch.from_numpy(np.concatenate(rows)), torch.tensor(grids, dtype=torch.int64), stamps


# ---------------------------------------------------------------------------------------------
# Prompts


_PLACEHOLDER = re.compile(
    "(?P<wrapped_video>" + re.escape(VISION_START + VIDEO_PAD + VISION_END) + ")"
    "|(?P<image>" + re.escape(IMAGE_PAD) + ")"
    "|(?P<video>" + re.escape(VIDEO_PAD) + ")"
)


def image_placeholder(grid: Sequence[int], merge_size: int = 2) -> str:
    return IMAGE_PAD * (math.prod(int(g) for g in grid) // merge_size**2)


def video_placeholder(grid: Sequence[int], timestamps: Sequence[float], merge_size: int = 2) -> str:
    t, h, w = (int(g) for g in grid)
    frame = VISION_START + VIDEO_PAD * (h * w // merge_size**2) + VISION_END
    return "".join(f"<{timestamps[k]:.1f} seconds>" + frame for k in range(t))


def expand_placeholders(
    text: str,
    images: Iterator[str],
    videos: Iterator[str],
    keep_outer_video_wrapper: bool = False,
) -> str:
    """Replace each image / video placeholder in ``text`` by the next expansion from ``images`` / ``videos``."""

    def substitute(match: re.Match) -> str:
        if match.lastgroup == "image":
            return next(images)
        expansion = next(videos)
        if match.lastgroup == "wrapped_video" and keep_outer_video_wrapper:
            return VISION_START + expansion + VISION_END
        return expansion

    return _PLACEHOLDER.sub(substitute, text)


class Processor:
    """Text or chat messages + images + videos -> the keyword arguments of ``model(...)`` / ``model.generate(...)``.

    ``model_config`` (optional) supplies the patch geometry and context length and is checked against
    the tokenizer's special-token ids.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: ProcessorConfig | None = None,
        model_config: Qwen3VLConfig | None = None,
        keep_outer_video_wrapper: bool = False,
    ) -> None:
        config = (config or ProcessorConfig()).validate()
        self.context_length: int | None = None
        if model_config is not None:
            v = model_config.vision
            model_geometry = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
            if (config.patch_size, config.merge_size, config.temporal_patch_size) != model_geometry:
                raise ConfigError(
                    f"preprocessing patch/merge/temporal sizes {config.patch_size}/{config.merge_size}/"
                    f"{config.temporal_patch_size} do not match the model's {'/'.join(map(str, model_geometry))}"
                )
            self.context_length = model_config.text.max_position_embeddings
            for token, expected in (
                (IMAGE_PAD, model_config.image_token_id),
                (VIDEO_PAD, model_config.video_token_id),
                (VISION_START, model_config.vision_start_token_id),
                (VISION_END, model_config.vision_end_token_id),
            ):
                if tokenizer.token_to_id(token) != expected:
                    raise TokenizerError(f"{tokenizer.name} gives {token} id {tokenizer.token_to_id(token)}, "
                                         f"the model expects {expected}")
        self.tokenizer = tokenizer
        self.config = config
        self.keep_outer_video_wrapper = keep_outer_video_wrapper

    @classmethod
    def from_pretrained(cls, path_or_preset: str | Path, **overrides: Any) -> Processor:
        """A checkpoint directory (its tokenizer.json, preprocessor configs and config.json), or a preset
        name (the byte-level fallback tokenizer, NOT Qwen's vocabulary). ``overrides``: ProcessorConfig fields."""
        name = str(path_or_preset)
        path = Path(name).expanduser()
        if not path.is_dir() and name not in PRESETS:
            raise ConfigError(
                f"'{name}' is neither a checkpoint directory nor a preset; presets are: {', '.join(PRESETS)}"
            )
        if path.is_dir():
            tokenizer = Tokenizer.from_dir(path)
            if tokenizer is None:
                raise TokenizerError(f"{path} has no tokenizer.json; give token ids instead of text")
            return cls(tokenizer, ProcessorConfig.from_dir(path).with_(**overrides), from_hf(path))
        return cls(Tokenizer.byte_fallback(), ProcessorConfig().with_(**overrides), preset(name))

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        *,
        messages: Sequence[dict] | Sequence[Sequence[dict]] | None = None,
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """``text`` (prompts already in chat format) or ``messages`` (one conversation, or a list of them).

        Images and videos fill the placeholders in order across the batch; they come from ``images`` /
        ``videos`` or from the message items (``{"type": "image", "image": ...}``), not both. Several
        prompts are left-padded with the pad token.
        """
        texts, images, videos = self._texts_and_media(text, messages, images, videos, add_generation_prompt)
        n_images = sum(t.count(IMAGE_PAD) for t in texts)
        n_videos = sum(t.count(VIDEO_PAD) for t in texts)
        if n_images != len(images):
            raise InputError(f"the prompt has {n_images} image placeholder(s) but {len(images)} image(s) were given")
        if n_videos != len(videos):
            raise InputError(f"the prompt has {n_videos} video placeholder(s) but {len(videos)} video(s) were given")

        out: dict[str, torch.Tensor | None] = {
            "pixel_values": None, "image_grid_thw": None, "pixel_values_videos": None, "video_grid_thw": None,
        }
        merge = self.config.merge_size
        image_texts: list[str] = []
        video_texts: list[str] = []
        if images:
            out["pixel_values"], out["image_grid_thw"] = preprocess_images(images, self.config)
            image_texts = [image_placeholder(g, merge) for g in out["image_grid_thw"].tolist()]
        if videos:
            out["pixel_values_videos"], out["video_grid_thw"], stamps = preprocess_videos(videos, self.config)
            grids = out["video_grid_thw"].tolist()
            video_texts = [video_placeholder(g, s, merge) for g, s in zip(grids, stamps, strict=True)]
        image_iter, video_iter = iter(image_texts), iter(video_texts)
        expanded = [expand_placeholders(t, image_iter, video_iter, self.keep_outer_video_wrapper) for t in texts]
        ids = self.tokenizer.encode_batch(expanded)
        longest = max(len(row) for row in ids)
        if min(len(row) for row in ids) == 0:
            raise InputError("a prompt is empty")
        if self.context_length is not None and longest > self.context_length:
            raise InputError(f"prompt of {longest} tokens is longer than the context ({self.context_length} tokens)")
        pad = self.tokenizer.pad_token_id
        out["input_ids"] = torch.tensor([[pad] * (longest - len(row)) + row for row in ids], dtype=torch.int64)
        out["attention_mask"] = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids],
                                             dtype=torch.int64)
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                     "pixel_values_videos", "video_grid_thw")}

    def _texts_and_media(self, text, messages, images, videos, add_generation_prompt):
        if (text is None) == (messages is None):
            raise InputError("give exactly one of text or messages")
        images = _as_list(images)
        videos = _as_list(videos)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise InputError("text must be a string or a non-empty list of strings")
            return texts, images, videos
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages or [])
        if not conversations:
            raise InputError("messages is empty")
        texts, item_images, item_videos = [], [], []
        for conversation in conversations:
            if not isinstance(conversation, Sequence) or isinstance(conversation, (str, dict)):
                raise InputError("messages must be a conversation (a list of message dicts) or a list of them")
            texts.append(apply_chat_template(conversation, add_generation_prompt))
            for message in conversation:
                if isinstance(message["content"], str):
                    continue
                for item in message["content"]:
                    kind = content_kind(item)
                    media = item.get("image", item.get("image_url")) if kind == "image" else item.get(kind)
                    if kind != "text" and media is not None:
                        (item_images if kind == "image" else item_videos).append(media)
        if (item_images and images) or (item_videos and videos):
            raise InputError("media given both inside the messages and as images=/videos=; use one")
        return texts, item_images or images, item_videos or videos


def _as_list(media: Any) -> list:
    if media is None:
        return []
    if isinstance(media, (list, tuple)):
        return list(media)
    return [media]


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from None
