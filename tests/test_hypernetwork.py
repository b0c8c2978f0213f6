"""Hypernetworks on tiny SD1, SD2 and SDXL checkpoints: a few steps each, then the exported `.pt` is checked against
the host's rules (tests/host_hypernetwork.py): it passes the safe unpickler, holds the host's keys, reloads to the
trainer's weights, and the host's own attention forward on it gives what the training hooks gave. Bad settings
are refused before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from conftest import write_images
from host_hypernetwork import HostHypernetwork, host_cross_attention
from lib_sdcustom import config as config_module
from lib_sdcustom.config import RunConfig
from lib_sdcustom.errors import ConfigError
from lib_sdcustom.formats.hypernetwork_file import hypernetwork_from_dict, read_hypernetwork_dict
from lib_sdcustom.formats.inspect import inspect_file
from lib_sdcustom.hashing import sha256_file
from lib_sdcustom.methods.hypernetwork import HypernetworkMethod, header_attention_widths
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.testing.tiny import write_tiny_sd1
from lib_sdcustom.testing.tiny_families import write_tiny_sd2, write_tiny_sdxl
from lib_sdcustom.networks.hypernetwork import (ACTIVATIONS, Hypernetwork, HypernetworkShape,
                                                hypernetwork_parameters)
from lib_sdcustom.run.context import RunContext
from lib_sdcustom.run.train import train

#: The host's file keys besides the widths, in the order its `Hypernetwork.save` writes them.
HOST_KEYS = ["step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
             "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
             "last_layer_dropout", "optional_info"]
#: Text-context width of each tiny family (SDXL's is CLIP-L + OpenCLIP-G, as 768 + 1280 = 2048 at full size).
CONTEXT = {"sd1": 64, "sd2": 64, "sdxl": 96}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hypernetwork_families")
    return {"sd1": write_tiny_sd1(root / "sd1"), "sd2": write_tiny_sd2(root / "sd2", v_prediction=True),
            "sdxl": write_tiny_sdxl(root / "sdxl")}


def make_config(base: Path, images: Path, root: Path, **hypernetwork: object) -> RunConfig:
    config = RunConfig(method="hypernetwork")
    config.model.base, config.data.data = str(base), str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "hn_x", str(root / "out"), str(root / "run")
    config.output.save_precision = "fp32"
    config.optimizer.lr = 5e-3
    config.training.steps, config.training.sample_steps, config.training.save_state_every = 3, 1, 0
    config.training.keep_final_state = True  # the tests read the trainer's last weights from it
    for key, value in hypernetwork.items():
        setattr(config.hypernetwork, key, value)
    return config


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((Path(run_dir) / "state").glob("step-*"))[-1] / "trainable.safetensors"))


def trainer_method(config: RunConfig) -> HypernetworkMethod:
    bundle = load_bundle(Path(config.model.base))
    context = RunContext(config=config, bundle=bundle, training_set=None, data_folder=Path(config.data.data),
                         run_dir=Path(config.output.run_dir), trigger_phrase="hn_x")
    return HypernetworkMethod(context)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_trains_exports_the_hosts_dict_and_reloads_equal(checkpoints, tmp_path, family):
    base = checkpoints[family]
    config = make_config(base, write_images(tmp_path / "images"), tmp_path)
    result = train(config)
    path = tmp_path / "out" / "hn_x.pt"
    assert result.outputs == [path, tmp_path / "out" / "hn_x.preview.png"]
    host = HostHypernetwork.load(path)  # the safe unpickler's checks, then the host's modules take the weights
    assert sorted(host.layers) == [CONTEXT[family]] and host.name == "hn_x"
    data = read_hypernetwork_dict(path)
    assert [key for key in data if not isinstance(key, int)] == HOST_KEYS
    assert data["step"] == 3 and data["sd_checkpoint"] == sha256_file(base)[:10]
    assert data["sd_checkpoint_name"] == base.stem
    assert data["layer_structure"] == [1.0, 2.0, 1.0] and data["dropout_structure"] == [0.0, 0.0, 0.0]
    assert data["activate_output"] is False and data["activation_func"] == "linear"
    assert list(data[CONTEXT[family]][0]) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
    trained = final_state(tmp_path / "run")
    reloaded = hypernetwork_from_dict(data).flat_state()
    assert reloaded.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(reloaded[key], value, atol=0, rtol=0)
    initial = trainer_method(config).trainable_state()
    assert any(not torch.equal(initial[key], value) for key, value in trained.items()), "nothing learned"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_hosts_attention_forward_on_the_file_matches_the_training_hooks(checkpoints, tmp_path, family):
    """A shape that shifts the module indices (activation, LayerNorm, a dropout) on both widths of the model, so
    self- and cross-attention are covered; compared at multiplier 1 (training) and 0.6 (a prompt weight)."""
    base = checkpoints[family]
    widths = sorted(header_attention_widths(base))
    config = make_config(base, write_images(tmp_path / "images"), tmp_path, layer_structure="1, 1.5, 1",
                         activation_func="relu", layer_norm=True, dropout_structure="0, 0.1, 0", activate_output=True,
                         widths=", ".join(map(str, widths)))
    config.training.steps = 2
    train(config)
    host = HostHypernetwork.load(tmp_path / "out" / "hn_x.pt")
    assert sorted(host.layers) == widths
    method = trainer_method(config)
    method.load_trainable_state(final_state(tmp_path / "run"))
    method.set_training(False)
    unet = method.bundle.unet
    generator = torch.Generator().manual_seed(0)
    compared = set()
    for attention in (module for module in unet.modules() if isinstance(module, Attention)):
        width = attention.to_k.in_features
        cross = attention.is_cross_attention
        x = torch.randn(2, 5, attention.to_q.in_features, generator=generator)
        context = torch.randn(2, 7, width, generator=generator) if cross else None
        ours = {}
        with torch.no_grad():
            for multiplier in (1.0, 0.6):
                method.network.set_multiplier(multiplier)
                ours[multiplier] = attention(x, encoder_hidden_states=context)
            method.network.detach()  # the host's forward below runs on the bare projections
            plain = attention(x, encoder_hidden_states=context)
        for multiplier, output in ours.items():
            host.set_multiplier(multiplier)
            torch.testing.assert_close(host_cross_attention(attention, x, context, host), output, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain, ours[1.0], atol=1e-6), "the hypernetwork changed nothing"
        method.network.attach(unet)
        compared.add((width, cross))
    assert {width for width, _ in compared} == set(widths) and {cross for _, cross in compared} == {True, False}
    method.close()


def test_learns_with_gradient_checkpointing_and_cached_text_conditioning(checkpoints, tmp_path):
    """The hooks sit inside the checkpointed transformer blocks, whose inputs need no gradient."""
    config = make_config(checkpoints["sd1"], write_images(tmp_path / "images"), tmp_path)
    config.training.gradient_checkpointing = config.training.cache_text_encoder_outputs = True
    train(config)
    initial = trainer_method(config).trainable_state()
    trained = final_state(tmp_path / "run")
    assert all(not torch.equal(initial[key], value) for key, value in trained.items() if key.endswith(".weight"))


def test_inspect_describes_the_file(checkpoints, tmp_path):
    config = make_config(checkpoints["sd1"], write_images(tmp_path / "images"), tmp_path, dropout_structure="0, 0.1, 0")
    config.training.steps = 1
    train(config)
    report = inspect_file(tmp_path / "out" / "hn_x.pt")
    for line in ("Kind: hypernetwork", "Prompt: <hypernet:hn_x:1>", "Widths: 64", "Layer structure: 1, 2, 1",
                 "Dropout structure: 0, 0.1, 0", "activate_output: False", "step: 1"):
        assert line in report, report


def test_the_activations_offered_are_the_ones_built():
    assert tuple(ACTIVATIONS) == config_module.HYPERNETWORK_ACTIVATIONS


@pytest.mark.parametrize(("widths", "structure"), [([768], (1.0, 2.0, 1.0)), ([2048, 640, 1280], (1.0, 1.5, 0.5, 1.0))])
def test_the_plans_parameter_count_is_the_modules(widths, structure):
    """The tab's memory estimate counts what training builds (4,723,200 for SD1.5's default)."""
    shape = HypernetworkShape(layer_structure=structure, dropout_structure=(0.0,) * len(structure))
    built = sum(parameter.numel() for parameter in Hypernetwork(widths, shape).parameters())
    assert hypernetwork_parameters(widths, structure) == built


@pytest.mark.parametrize(("settings", "problem"), [
    ({"widths": "2048"}, "names [2048], but the attentions of tiny.safetensors have the widths [32, 64]"),
    ({"layer_structure": "2, 1"}, "does not start and end with 1"),
    ({"layer_structure": "1, 2"}, "does not start and end with 1"),
    ({"layer_structure": "1, x, 1"}, "is not a comma-separated list of numbers"),
    ({"dropout_structure": "0, 0.1"}, "has 2 values for 3 layer sizes"),
    ({"dropout_structure": "0.1, 0, 0"}, "must start and end with 0"),
    ({"widths": "64.5"}, "holds a number that is no width"),
])
def test_bad_settings_are_refused_before_the_model_loads(checkpoints, tmp_path, monkeypatch, settings, problem):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lib_sdcustom.models.loader.load_bundle", no_load)
    config = make_config(checkpoints["sd1"], write_images(tmp_path / "images"), tmp_path, **settings)
    with pytest.raises(ConfigError) as refused:
        train(config)
    assert problem in str(refused.value.problem), refused.value.problem
    assert not (tmp_path / "out").exists()
