"""The network algorithms we train, and what each means for targets, training forward and metadata.

LyCORIS implements the algorithms; this table is the one place that says which LyCORIS algorithm backs
each of our method names, whether it reaches into ResNet convolutions, which layers the host can apply it
to, whether LyCORIS's bypass forward computes what the host will, and how kohya tools label it. A new
algorithm is a row here and a `METHOD_SPECS` row (plus `file_layout` when its file differs from LyCORIS's
state dict).
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
    #: The host's module applies it to Linear layers only (its (IA)^3 and GLoRA updates are 2-D matrix
    #: products that fail on a conv weight, and a failed layer is skipped with a debug log), so convolutions
    #: inside the target blocks (SD1/SD2's 1x1 proj_in/proj_out) are left out.
    linear_only: bool = False
    #: LyCORIS's bypass forward equals the merged weight the host builds. OFT and (IA)^3 on the output
    #: rotate or scale the layer's bias too in bypass mode, while the host changes the weight alone, so
    #: they train on the merged weight, as DoRA must (its bypass forward skips the decomposition).
    bypass_matches_host: bool = True
    #: `--dora` (weight-decomposed updates) is offered: LoRA and LoCon, the types the host reads `dora_scale` with
    #: and LyCORIS trains it for in the host's orientation.
    supports_dora: bool = False
    #: The update is an up matrix times a down matrix (LyCORIS's `lora_up` @ `lora_down`), the pair whose rates
    #: LoRA+ sets apart (`--loraplus-lr-ratio`).
    up_matrix: bool = False
    #: The smallest --rank that works on every Stable Diffusion layer, whether it must be even, and why.
    min_rank: int = 1
    even_rank: bool = False
    rank_note: str = ""

    def metadata_algo(self, dora: bool) -> str:
        """The `algo` of `ss_network_args`: LyCORIS's name for it; a DoRA LoRA is LyCORIS's LoCon module (kohya's
        own `networks.lora` has no DoRA)."""
        if self.lycoris_algo != "lora":
            return self.lycoris_algo
        return "locon" if dora else self.name

    @property
    def unet_blocks(self) -> tuple[str, ...]:
        return UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if self.trains_convolutions else ())


ALGORITHMS: dict[str, NetworkAlgorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        NetworkAlgorithm("lora", "lora", False, "networks.lora", "low-rank update of attention layers",
                         supports_dora=True, up_matrix=True),
        NetworkAlgorithm("locon", "lora", True, "lycoris.kohya", "LoRA extended to ResNet convolutions",
                         supports_dora=True, up_matrix=True),
        NetworkAlgorithm("loha", "loha", True, "lycoris.kohya", "Hadamard product of two low-rank updates"),
        NetworkAlgorithm("lokr", "lokr", True, "lycoris.kohya", "Kronecker product update"),
        NetworkAlgorithm("oft", "diag-oft", False, "lycoris.kohya",
                         "orthogonal rotation of each layer's outputs in blocks of --rank channels",
                         bypass_matches_host=False, min_rank=2,
                         rank_note="OFT's rank is its block size, and a block of one channel cannot rotate."),
        NetworkAlgorithm("boft", "boft", False, "lycoris.kohya",
                         "butterfly orthogonal rotation (OFT mixing across blocks)", bypass_matches_host=False,
                         min_rank=10, even_rank=True,
                         rank_note="BOFT's rank is its largest block size, an even number, and Stable Diffusion's "
                                   "320/640/1280-wide layers split into a power-of-two count of blocks only with "
                                   "blocks of 10 or more."),
        NetworkAlgorithm("ia3", "ia3", False, "lycoris.kohya", "learned per-channel scale of each layer's outputs",
                         linear_only=True, bypass_matches_host=False),
        NetworkAlgorithm("glora", "glora", False, "lycoris.kohya", "generalised LoRA: W + W A + B, A and B low-rank",
                         linear_only=True),
    )
}


def algorithm_for(method: str) -> NetworkAlgorithm:
    """The network algorithm a training method trains (its spec's `network_algorithm`: DreamBooth-LoRA is a
    LoRA trained on DreamBooth batches)."""
    algorithm = method_spec(method).network_algorithm
    if algorithm is None:
        raise ValueError(f"{method} trains no network")
    return ALGORITHMS[algorithm]
