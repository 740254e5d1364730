"""Batched input jitter (§3: the teacher saw inputs "jittered by up to two pixels in any direction").

One batched copy of each image's shifted window: no per-sample Python, so it costs little next to the forward
pass. The random shifts are drawn apart from applying them, so several processes sharing one batch
(``distributed``) can draw the whole batch's shifts, as one process would, and each apply only its own rows'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def jitter_offsets(batch: int, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Random offsets ``[2, batch, 1]`` into the zero-padded images (None when ``max_shift`` <= 0: nothing drawn)."""
    if max_shift <= 0:
        return None
    return torch.randint(0, 2 * max_shift + 1, (2, batch, 1), generator=generator)


def translate(images: torch.Tensor, offsets: torch.Tensor | None, max_shift: int) -> torch.Tensor:
    """Shift each image in ``[B, H, W]`` (or ``[B, C, H, W]``: all channels alike) by its offsets from
    :func:`jitter_offsets`, zero-filled."""
    if offsets is None:
        return images
    if images.dim() not in (3, 4):
        raise ValueError(f"jitter translates images [B, H, W] or [B, C, H, W], got shape {list(images.shape)}")
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    # Every shift of an image is a window of its padded image: copying each image's window (a strided view)
    # measured 3x faster than gathering its pixels one by one. Offset 0 shifts by +max_shift, 2*max_shift by -max_shift.
    windows = padded.unfold(-2, h, 1).unfold(-2, w, 1)  # [B, (C,) 2m+1, 2m+1, H, W]
    if images.dim() == 4:
        windows = windows.movedim(1, 3)  # [B, 2m+1, 2m+1, C, H, W]
    offsets = offsets.to(images.device)
    return windows[torch.arange(b, device=images.device), offsets[0, :, 0], offsets[1, :, 0]]


def jitter(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image in ``[B, H, W]`` or ``[B, C, H, W]`` by its own random (dy, dx) in
    [-max_shift, max_shift], zero-filled."""
    return translate(images, jitter_offsets(len(images), max_shift, generator), max_shift)


def check_jitter(max_shift: int, image_shape: tuple[int, ...]) -> None:
    """A shift of more than half the image moves most of it out of the frame: refused, with the largest allowed."""
    from .errors import DarkKnowledgeError
    if max_shift and len(image_shape) < 2:
        raise DarkKnowledgeError(f"jitter shifts images; these inputs are of shape {tuple(image_shape)}: use 0")
    largest = min(image_shape[-2:]) // 2 if len(image_shape) >= 2 else 0
    if not 0 <= max_shift <= largest:
        raise DarkKnowledgeError(f"jitter {max_shift} does not fit images of {'x'.join(map(str, image_shape))}: "
                                 f"use 0 to {largest} pixels")
