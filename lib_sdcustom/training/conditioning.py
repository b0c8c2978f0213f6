"""What the UNet is conditioned on, as one typed value shared by training, previews and class images.

SD1 and SD2 UNets take only the text encoder's hidden states (`context`). SDXL's UNet also takes the second
text encoder's projected pooled vector and six "size and crop" numbers per sample (the picture's original
height and width, the crop's top-left corner, the target height and width); diffusers passes both as
`added_cond_kwargs`. Text and geometry come from different places (captions vs. the image), so they are
kept apart until the UNet call: `Conditioning` holds what the text encoders give, `SizeConditioning` what
the data loader knows about each picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Tuple

import torch

#: (height, width) in pixels, the order SDXL's time ids use.
HeightWidth = Tuple[int, int]


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning for one sample: `original` size of the picture before resizing, the `crop`
    (top, left) cut from the resized picture, and the `target` size trained at, all (height, width)."""

    original: HeightWidth
    crop: HeightWidth
    target: HeightWidth

    @classmethod
    def uncropped(cls, height: int, width: int) -> "SizeConditioning":
        """A picture used at its own size: what previews and generated class images are."""
        return cls(original=(height, width), crop=(0, 0), target=(height, width))

    def time_ids(self) -> list[float]:
        return [float(value) for value in (*self.original, *self.crop, *self.target)]


def time_ids(sizes: Sequence[SizeConditioning]) -> torch.Tensor:
    """[B, 6] float32: (original h, w, crop top, left, target h, w) per sample."""
    return torch.tensor([size.time_ids() for size in sizes], dtype=torch.float32)


@dataclass
class Conditioning:
    """Text conditioning for a batch: `context` [B, tokens, width] for cross-attention, and for SDXL the
    pooled [B, 1280] `text_embeds` of the second (OpenCLIP bigG) encoder; None for SD1/SD2."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> "Conditioning":
        """Like `Tensor.to` on every part (device and/or dtype)."""
        return Conditioning(self.context.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def detach(self) -> "Conditioning":
        return Conditioning(self.context.detach(), None if self.pooled is None else self.pooled.detach())

    @classmethod
    def cat(cls, parts: Sequence["Conditioning"]) -> "Conditioning":
        """Batch several conditionings (e.g. unconditional and conditional for guidance)."""
        pooled = [part.pooled for part in parts]
        if any(item is None for item in pooled) and not all(item is None for item in pooled):
            raise ValueError("cannot batch conditioning with and without a pooled vector")
        return cls(torch.cat([part.context for part in parts]),
                   None if pooled[0] is None else torch.cat(pooled))  # type: ignore[arg-type]

    def unet_kwargs(self, sizes: Sequence[SizeConditioning] | None = None) -> dict[str, Any]:
        """Keyword arguments for `UNet2DConditionModel.__call__` after (sample, timestep).

        With a pooled vector (SDXL) `sizes` must give each sample's size conditioning; SD1/SD2 ignore it."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.context}
        if self.pooled is None:
            return kwargs
        if sizes is None or len(sizes) != len(self):
            raise ValueError(f"SDXL conditioning needs one SizeConditioning per sample ({len(self)}), "
                             f"got {None if sizes is None else len(sizes)}")
        kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled,
                                       "time_ids": time_ids(sizes).to(self.pooled.device, self.pooled.dtype)}
        return kwargs


def as_conditioning(value: "Conditioning | torch.Tensor") -> Conditioning:
    """A plain hidden-state tensor (what SD1/SD2 encoders give) as a `Conditioning`."""
    return value if isinstance(value, Conditioning) else Conditioning(value)
