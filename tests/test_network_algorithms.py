"""DoRA, OFT, BOFT, (IA)^3 and GLoRA on tiny SD1, SD2 (v) and SDXL checkpoints: a few steps each, then the file
is checked against the host's own rules: every key maps to a host module, every module has the host type
it was meant to have (`dora_scale` as [1, in]), the host's update of each weight (`host_rules.host_weight_update`,
a port of its `calc_updown`) applied to a fresh base gives the trainer's outputs, the file reloads to the
trainer's model, and LyCORIS's own loader reproduces it where LyCORIS reads the host's layout (OFT, BOFT).
LyCORIS 4.1's loader cannot read the others: it builds DoRA with `dora_scale` on the output side, passes
IA3's `on_input` to a constructor without it, and expects GLoRA in its own newer factor names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import write_images
from host_rules import host_target_for, host_weight_update
from lib_sdcustom.formats.inspect import inspect_file
from lib_sdcustom.formats.network_file import group_network_keys, host_module_type, module_type_of, read_network_file
from lib_sdcustom.models.bundle import ModelFamily
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.networks.algorithms import algorithm_for
from lib_sdcustom.networks.kohya_names import from_file_names
from lib_sdcustom.networks.lycoris_backend import kohya_targets, text_encoder_views
from lib_sdcustom.run.train import train
from test_sdxl_sd2_networks import checkpoints  # noqa: F401  (the tiny SD1, SD2-v and SDXL checkpoints fixture)
from test_sdxl_sd2_networks import assert_same_outputs, host_names_for, make_config, model_outputs, trained_state, with_network
from test_train_network import host_layer_names as sd1_host_layer_names

#: variant -> (method, --dora, host module type, what `inspect` calls the file)
VARIANTS = {
    "dora": ("lora", True, "LoRA", "with DoRA"),
    "locon_dora": ("locon", True, "LoRA", "with DoRA"),
    "oft": ("oft", False, "OFT", "OFT"),
    "boft": ("boft", False, "OFT", "BOFT"),
    "ia3": ("ia3", False, "IA3", "IA3"),
    "glora": ("glora", False, "GLoRA", "GLoRA"),
}
FAMILIES = ("sd1", "sd2", "sdxl")


def train_variant(base: Path, images: Path, folder: Path, variant: str):
    """A short run of `variant`: (exported file, config, trainer's final network state)."""
    method, dora, _, _ = VARIANTS[variant]
    config = make_config(base, images, folder, method)
    config.network.dora = dora
    config.network.rank = 16 if method == "boft" else 4  # BOFT: an even block size (tiny widths are 2^n)
    return train(config).outputs[0], config, trained_state(Path(config.output.run_dir))


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory):
    """(family, variant) -> `train_variant`'s result."""
    root = tmp_path_factory.mktemp("trained")
    images = write_images(root / "images")
    return {(family, variant): train_variant(checkpoints[family], images, root / family / variant, variant)
            for family in FAMILIES for variant in VARIANTS}


def host_layer_names(bundle) -> set[str]:
    if bundle.family is ModelFamily.SD1:
        return sd1_host_layer_names(bundle)
    return host_names_for(bundle.family, bundle.unet, *bundle.text_encoders)


def trainer_modules(bundle) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of the bundle under the name LyCORIS gives its network module (kohya's SD1 names)."""
    views = text_encoder_views(bundle.text_encoders)
    encoders = {"lora_te": views} if not isinstance(views, list) else {f"lora_te{i + 1}": v for i, v in enumerate(views)}
    modules = {}
    for prefix, root in (("lora_unet", bundle.unet), *encoders.items()):
        for path, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                modules[f"{prefix}_{path.replace('.', '_')}"] = module
    return modules


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_maps_with_the_intended_host_type(trained, checkpoints, family, variant):
    path, config, _ = trained[family, variant]
    _, dora, kind, _ = VARIANTS[variant]
    bundle = load_bundle(checkpoints[family])
    names = host_layer_names(bundle)
    tensors, metadata = read_network_file(path)
    modules, bundled = group_network_keys(list(tensors))
    assert modules and not bundled
    assert not sorted(m for m in modules if host_target_for(m, names) is None)
    for module, parts in modules.items():
        assert module_type_of(parts).name == kind, (module, sorted(parts))
        assert ("dora_scale" in parts) == dora
        if dora:  # the host normalises per input column: [1, in] (and [1, in, 1, 1] on a convolution)
            down = tensors[f"{module}.lora_down.weight"]
            assert tensors[f"{module}.dora_scale"].shape == ((1, down.shape[1]) if down.dim() == 2 else (1, down.shape[1], 1, 1))
    if variant == "boft":
        assert all(tensors[f"{m}.oft_blocks"].dim() == 4 for m in modules)
    if algorithm_for(config.method).linear_only:  # the host's IA3/GLoRA updates fail on convolution weights
        layers = trainer_modules(bundle)
        assert all(isinstance(layers[m], nn.Linear) for m in group_network_keys(list(from_file_names(tensors, bundle.unet)))[0])
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert ('"dora_wd": "True"' in metadata["ss_network_args"]) == dora


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_hosts_update_of_each_weight_gives_the_trainers_model(trained, checkpoints, family, variant):
    path, config, trainable = trained[family, variant]
    expected = model_outputs(with_network(checkpoints[family], config.method, config, trainable))
    base = load_bundle(checkpoints[family])
    before = model_outputs(base)
    tensors, _ = read_network_file(path)
    layers = trainer_modules(base)
    trainer_tensors = from_file_names(tensors, base.unet)
    modules, _ = group_network_keys(list(trainer_tensors))
    with torch.no_grad():
        for module, parts in modules.items():
            kind = host_module_type(parts).name
            layer = layers[module]
            weights = {part: trainer_tensors[f"{module}.{part}"] for part in parts}
            layer.weight += host_weight_update(kind, weights, layer.weight).to(layer.weight.dtype)
    base.unet.eval()
    after = model_outputs(base)
    assert not torch.allclose(after[2], before[2]), "the network must change the UNet output"
    assert_same_outputs(after, expected)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_file_reloads_to_the_trainers_model(trained, checkpoints, family, variant):
    path, config, trainable = trained[family, variant]
    tensors, _ = read_network_file(path)
    expected = model_outputs(with_network(checkpoints[family], config.method, config, trainable))
    assert_same_outputs(model_outputs(with_network(checkpoints[family], config.method, config, tensors)), expected)


@pytest.mark.parametrize("variant", ["oft", "boft"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lycoris_loader_reproduces_the_trainers_model(trained, checkpoints, family, variant):
    from lycoris.kohya import create_network_from_weights

    path, config, trainable = trained[family, variant]
    base = load_bundle(checkpoints[family])
    views = text_encoder_views(base.text_encoders)
    weights = from_file_names(read_network_file(path)[0], base.unet)
    with kohya_targets(algorithm_for(config.method)):
        network, _ = create_network_from_weights(1.0, None, base.vae, views, base.unet, weights_sd=weights)
    network.apply_to(views, base.unet, True, True)
    network.load_state_dict(weights)
    assert len(network.loras) == len(group_network_keys(list(weights))[0])
    base.unet.eval()
    assert_same_outputs(model_outputs(base), model_outputs(with_network(checkpoints[family], config.method, config, trainable)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_names_the_module_type(trained, variant):
    path, _, _ = trained["sd1", variant]
    report = inspect_file(path)
    assert VARIANTS[variant][3] in report.split("Format: ")[1].splitlines()[0]
    assert "Warning" not in report
