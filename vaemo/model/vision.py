"""Frames -> the Qwen2.5-VL vision tower's inputs (pixel_values_videos, video_grid_thw), by our code.

transformers' video processors need torchvision, which cannot be installed beside CPU torch, so the
patch layout is reproduced here and checked against Qwen2VLImageProcessorPil in the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# OpenAI CLIP statistics, what Qwen2.5-VL's preprocessor_config.json ships.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisualSpec:
    """How frames become vision-tower patches; saved with the model so evaluation decodes alike."""

    num_frames: int
    height: int
    width: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    frame_sampling: str = "uniform"  # how the frames were picked from the clip (data.frame_sampling)
    pair_seconds: float = 0.1  # data.pair_seconds
    frame_fit: str = "letterbox"  # data.frame_fit

    def check(self) -> None:
        unit = self.patch_size * self.merge_size
        if self.height % unit or self.width % unit:
            raise ValueError(
                f"frame size {self.height}x{self.width} must be a multiple of patch_size x "
                f"spatial_merge_size = {unit} (data.frame_height / data.frame_width)"
            )
        if self.num_frames % self.temporal_patch_size:
            raise ValueError(
                f"data.num_frames={self.num_frames} must be a multiple of the temporal patch size {self.temporal_patch_size}"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) patches per clip."""
        return (self.num_frames // self.temporal_patch_size, self.height // self.patch_size, self.width // self.patch_size)

    @property
    def tokens_per_clip(self) -> int:
        t, h, w = self.grid
        return t * h * w // (self.merge_size**2)

    def to_dict(self) -> dict:
        return asdict(self)


def patchify(video: torch.Tensor, spec: VisualSpec) -> torch.Tensor:
    """(T, C, H, W) normalised frames -> (t*h*w, C*tps*p*p) in the processor's patch order."""
    p, tps, merge = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    frames, channels, height, width = video.shape
    gt, gh, gw = frames // tps, height // p, width // p
    x = video.reshape(gt, tps, channels, gh // merge, merge, p, gw // merge, merge, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, channels * tps * p * p)


def video_inputs(video: torch.Tensor, spec: VisualSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, F, 3, H, W) uint8 clips -> pixel_values_videos (B*t*h*w, 3*tps*p*p) and video_grid_thw (B, 3)."""
    clips, frames, channels, height, width = video.shape
    grid = (frames // spec.temporal_patch_size, height // spec.patch_size, width // spec.patch_size)
    # Patchify the bytes, then normalise each patch column in place: the same float operations per pixel
    # as normalising the frames first (bit for bit), in one buffer instead of four fresh ones. Normalising
    # the (B, F, 3, H, W) frames took 14% of a tiny stage-0 step in the trainer (bench/video_inputs.py).
    patches = patchify(video.reshape(clips * frames, channels, height, width), spec).float()
    values_per_channel = spec.temporal_patch_size * spec.patch_size**2
    mean = torch.tensor(spec.image_mean, dtype=torch.float32).repeat_interleave(values_per_channel)
    std = torch.tensor(spec.image_std, dtype=torch.float32).repeat_interleave(values_per_channel)
    patches.div_(255.0).sub_(mean).div_(std)
    return patches.to(dtype), torch.tensor([grid] * clips, dtype=torch.long)


class PatchProjection(nn.Conv3d):
    """Qwen's patch embedding (a Conv3d whose stride is its kernel, fed one patch per row) as one matrix product.

    The convolution kernels are slow for this shape: on a CPU thread the forward and backward of the tiny
    preset's batch take 71 ms as Conv3d and 14 ms as a matrix product; in bf16 the Conv3d backward falls back
    to a kernel that takes 8.9 s (bench/cpu_precision_step.py prints both), and cuDNN has had such cliffs on GPUs too (what
    transformers' `fusion_config={"patch_embeddings": True}` answers). Unlike that fusion this keeps the
    Conv3d's weight, name and layout, so checkpoints, ZeRO-3 partitions and exports stay as they were; the
    product runs inside the module's own forward, where ZeRO-3 has gathered the weight.
    """

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if tuple(patches.shape[2:]) != tuple(self.kernel_size):
            return super().forward(patches)
        return F.linear(patches.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None, None]


def use_matmul_patch_embedding(vlm: nn.Module) -> None:
    """Swap the class of every non-overlapping Conv3d in the VLM (the vision tower's patch embedding)."""
    for module in vlm.modules():
        if (
            type(module) is nn.Conv3d
            and module.stride == module.kernel_size
            and module.padding == (0, 0, 0)
            and module.dilation == (1, 1, 1)
            and module.groups == 1
        ):
            module.__class__ = PatchProjection
