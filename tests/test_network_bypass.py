"""Training runs every network in LyCORIS bypass mode (`W x + network(x)`, no weight update built per step).
These tests hold it to the merged-weight form it replaced: the same outputs and gradients to float rounding,
and the same exported file for the same weights: the tensor data byte for byte, the header (names, dtypes,
shapes, offsets, metadata) equal as parsed. The header's bytes can differ in metadata order even between two
writes of one file: safetensors 0.4 keeps metadata in a hash map.

Files are compared two ways: against the merged-weight path in the same process, and against digests of
files written on main at 7428fcf (before bypass became the default) by the same procedure, in both the
pinned and the current venv (they agreed). A digest covers the header as parsed (keys sorted) and the raw
tensor data.
"""

from __future__ import annotations

from pathlib import Path

import hashlib
import json

import pytest
import torch

from lib_sdcustom.config import NetworkOptions
from lib_sdcustom.formats.network_file import write_network_file
from lib_sdcustom.formats.safetensors_io import read_header
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.testing.tiny import write_tiny_sd1
from lib_sdcustom.testing.tiny_families import write_tiny_sdxl
from lib_sdcustom.networks.algorithms import ALGORITHMS
from lib_sdcustom.networks.kohya_names import to_file_names
from lib_sdcustom.networks.lycoris_backend import attach_network

OPTIONS = NetworkOptions(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)


def _filled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight random and non-zero (a fresh network's up weights are zero, which would hide the update)."""
    generator = torch.Generator().manual_seed(0)
    return {key: value if key.endswith("alpha") else 0.1 * torch.randn(value.shape, generator=generator)
            for key, value in sorted(state.items())}


def _file_contents(path: Path) -> tuple[object, bytes]:
    """The parsed header and the raw tensor data of a safetensors file."""
    header = read_header(path)
    return header, path.read_bytes()[header.data_offset:]


def _run(tiny_checkpoint: Path, method: str, *, bypass: bool, weights: dict[str, torch.Tensor] | None,
         out: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], tuple[object, bytes]]:
    """Outputs, parameter gradients and the exported file of the UNet + text encoder carrying the network."""
    bundle = load_bundle(tiny_checkpoint)
    torch.manual_seed(0)
    attached = attach_network(bundle.unet, bundle.text_encoder, ALGORITHMS[method], OPTIONS,
                              train_text_encoder=True, bypass=bypass)
    attached.load_state_dict(weights if weights is not None else _filled(attached.state_dict()))
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    ids = bundle.tokenizer(["a photo", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = bundle.text_encoder(ids)[0]
    output = bundle.unet(latents, torch.tensor([10, 700]), hidden).sample
    (output * torch.randn(output.shape, generator=generator)).sum().backward()
    gradients = {name: parameter.grad.clone() for name, parameter in attached.network.named_parameters()
                 if parameter.grad is not None}
    target = write_network_file(out / f"{method}_{'bypass' if bypass else 'merged'}.safetensors",
                                to_file_names(attached.state_dict(), bundle.unet),
                                {"ss_network_module": ALGORITHMS[method].kohya_module}, dtype=torch.float16)
    state = attached.state_dict()
    attached.detach()
    return output.detach(), gradients, state, _file_contents(target)


@pytest.mark.parametrize("method", list(ALGORITHMS))
def test_bypass_forward_matches_the_merged_weight_forward_and_writes_the_same_file(tiny_checkpoint, tmp_path, method):
    merged_output, merged_gradients, weights, merged_file = _run(tiny_checkpoint, method, bypass=False, weights=None,
                                                                 out=tmp_path)
    output, gradients, _, file = _run(tiny_checkpoint, method, bypass=True, weights=weights, out=tmp_path)

    assert merged_output.abs().max() > 0
    torch.testing.assert_close(output, merged_output, rtol=1e-4, atol=1e-5)
    assert gradients.keys() == merged_gradients.keys() and len(gradients) > 0
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, merged_gradients[name], rtol=1e-3, atol=1e-5, msg=name)
    assert file == merged_file


def test_networks_attach_in_bypass_mode_by_default(tiny_checkpoint):
    bundle = load_bundle(tiny_checkpoint)
    attached = attach_network(bundle.unet, bundle.text_encoder, ALGORITHMS["locon"], OPTIONS, train_text_encoder=True)
    modules = attached.unet_modules + attached.text_encoder_modules
    assert modules and all(module.bypass_mode for module in modules)
    assert all("bypass_forward_diff" in vars(module) for module in modules)  # the lean forward (lean_forward.py)
    assert any(isinstance(module.org_module[0], torch.nn.Conv2d) for module in modules)
    attached.detach()


# Written on main at 7428fcf by `_digest_of_export` (the same code, run there), pinned and current venvs alike.
MAIN_DIGESTS = {
    ("sd1", "lora"): "07e1a6648d8d6c74b5c14169a701c18e4a9d79bf1b92d3e5639c1e7676494183",
    ("sd1", "locon"): "3e9d83ae1e9f807f4fa76533141f7bf8400a7cdf6413ed3066aa3601e21d7cf7",
    ("sd1", "loha"): "faa255cfae3838cf6b90a8e5b550e45dd7f20c1360470b5bfe6f9945445e68b3",
    ("sd1", "lokr"): "47f45838bfe1ff74e1d0bc77f465a883737a2ca2c995833d0ca643a6442a9018",
    ("sdxl", "lora"): "c649d72f62637f1418c28b3daa6208f36662634e9bd95134e66496caf0b8dd6d",
    ("sdxl", "locon"): "0afef5012e1bf231280c0deea723010266a346f53429fb74dd267ed7a73304df",
    ("sdxl", "loha"): "26897e58f31d8baf8af12c5c1c6a77a627a31c65b57448a4a7f1ae3ae61547d3",
    ("sdxl", "lokr"): "6d232986ffd695cf57690f0d859f3af1df421a1a8f3185f4cb2cb76894d32141",
}


def _digest_of_export(checkpoint: Path, method: str, version: str, out: Path) -> str:
    """Attach with a rank-4 network (seeded), give every weight a fixed random value, export in fp16."""
    bundle = load_bundle(checkpoint)
    algorithm = ALGORITHMS[method]
    attached = attach_network(bundle.unet, bundle.text_encoders, algorithm,
                              NetworkOptions(rank=4, alpha=2.0, lokr_factor=4), train_text_encoder=True)
    generator = torch.Generator().manual_seed(0)
    attached.load_state_dict({key: value if key.endswith("alpha") else torch.randn(value.shape, generator=generator)
                              for key, value in sorted(attached.state_dict().items())})
    target = write_network_file(out / f"{method}.safetensors", to_file_names(attached.state_dict(), bundle.unet),
                                {"ss_network_module": algorithm.kohya_module, "ss_base_model_version": version},
                                dtype=torch.float16)
    attached.detach()
    raw = target.read_bytes()
    header = read_header(target)
    parsed = json.loads(raw[8:header.data_offset])
    return hashlib.sha256(json.dumps(parsed, sort_keys=True).encode() + raw[header.data_offset:]).hexdigest()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_exported_files_are_what_main_wrote_for_the_same_weights(tmp_path, family):
    checkpoint = (write_tiny_sd1(tmp_path / "model", name="tiny", seed=0) if family == "sd1"
                  else write_tiny_sdxl(tmp_path / "model"))
    version = "sd_v1" if family == "sd1" else "sdxl_base_v1-0"
    for method in (method for pinned_family, method in MAIN_DIGESTS if pinned_family == family):  # those main had
        assert _digest_of_export(checkpoint, method, version, tmp_path) == MAIN_DIGESTS[(family, method)], method
