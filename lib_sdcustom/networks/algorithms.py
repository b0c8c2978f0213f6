"""The network algorithms we train, and what each means for targets and metadata.

LyCORIS implements the algorithms; this table is the one place that says which LyCORIS algorithm backs
each of our method names, whether it reaches into ResNet convolutions, and how kohya tools label it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..methods.registry import method_spec

# kohya's targets: attention blocks of the UNet and the CLIP attention/MLP blocks; LoCon-style
# algorithms add the ResNet, down- and up-sampler blocks. conv_in/conv_out/time embedding stay out.
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class NetworkAlgorithm:
    name: str
    lycoris_algo: str
    trains_convolutions: bool
    kohya_module: str  # ss_network_module
    summary: str

    @property
    def unet_blocks(self) -> tuple[str, ...]:
        return UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if self.trains_convolutions else ())


ALGORITHMS: dict[str, NetworkAlgorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        NetworkAlgorithm("lora", "lora", False, "networks.lora", "low-rank update of attention layers"),
        NetworkAlgorithm("locon", "lora", True, "lycoris.kohya", "LoRA extended to ResNet convolutions"),
        NetworkAlgorithm("loha", "loha", True, "lycoris.kohya", "Hadamard product of two low-rank updates"),
        NetworkAlgorithm("lokr", "lokr", True, "lycoris.kohya", "Kronecker product update"),
    )
}


def algorithm_for(method: str) -> NetworkAlgorithm:
    """The network algorithm a training method trains (its spec's `network_algorithm`: DreamBooth-LoRA is a
    LoRA trained on DreamBooth batches)."""
    algorithm = method_spec(method).network_algorithm
    if algorithm is None:
        raise ValueError(f"{method} trains no network")
    return ALGORITHMS[algorithm]
