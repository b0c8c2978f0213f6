"""Optional fp8 storage of the frozen base (training.fp8_base): off by default, refused plainly where it cannot
work, and on the CPU the outputs stay close while the stored weights shrink; training still learns."""

from __future__ import annotations

import pytest
import torch

from lib_sdcustom.config import RunConfig
from lib_sdcustom.errors import ConfigError
from lib_sdcustom.models import fp8
from lib_sdcustom.models.loader import load_bundle


def _outputs(bundle) -> tuple:
    ids = bundle.tokenizer(["a sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = bundle.text_encoder(ids)[0]
        return hidden, bundle.unet(latents, torch.tensor([500]), hidden).sample


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


def test_fp8_storage_keeps_outputs_close_and_shrinks_the_weights(tiny_checkpoint):
    assert RunConfig().training.fp8_base is False
    reference, bundle = load_bundle(tiny_checkpoint), load_bundle(tiny_checkpoint)
    before = fp8.stored_bytes([bundle.unet, bundle.text_encoder])

    fp8.store_frozen_base_in_fp8(bundle, torch.device("cpu"))

    stored = {parameter.dtype for parameter in bundle.unet.parameters()}
    assert fp8.FP8_STORAGE in stored and bundle.unet.dtype == torch.float32  # computes in the old dtype
    embedding = bundle.text_encoder.get_input_embeddings().weight
    assert embedding.dtype == torch.float32  # Textual Inversion trains these rows
    after = fp8.stored_bytes([bundle.unet, bundle.text_encoder])
    layers = sum(module.weight.numel() for module in bundle.unet.modules() if type(module) in (torch.nn.Linear, torch.nn.Conv2d))
    assert before - after >= 0.95 * 3 * layers  # 4 bytes -> 1 for (nearly) every UNet layer weight
    (hidden, noise), (expected_hidden, expected_noise) = _outputs(bundle), _outputs(reference)
    assert 0 < _relative(hidden, expected_hidden) < 0.15 and 0 < _relative(noise, expected_noise) < 0.2


class _Model(torch.nn.Module):
    """One layer behind a first parameter (what `model.dtype` reads, so it keeps its dtype)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.layer = layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.scale


@pytest.mark.parametrize("layer, shape", [(torch.nn.Linear(8, 6), (2, 8)),
                                          (torch.nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 8, 8))])
def test_fp8_layers_give_exactly_the_rounded_weights_outputs_and_input_gradients(layer, shape):
    import copy

    rounded = copy.deepcopy(layer).requires_grad_(False)
    with torch.no_grad():
        rounded.weight.copy_(layer.weight.to(fp8.FP8_STORAGE).float())
    model = _Model(layer)
    assert fp8.store_in_fp8(model) == 1
    assert layer.weight.dtype == fp8.FP8_STORAGE and model.scale.dtype == layer.bias.dtype == torch.float32
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    stored_in, rounded_in = inputs.clone().requires_grad_(True), inputs.clone().requires_grad_(True)
    stored_out, rounded_out = model(stored_in), rounded(rounded_in)
    stored_out.square().sum().backward()
    rounded_out.square().sum().backward()
    assert torch.equal(stored_out, rounded_out) and torch.equal(stored_in.grad, rounded_in.grad)


def test_unsupported_places_are_refused_with_the_reason(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(fp8, "FP8_STORAGE", None)
    assert "no float8_e4m3fn" in fp8.fp8_problem(torch.device("cpu"))
    with pytest.raises(ConfigError) as refused:
        fp8.store_frozen_base_in_fp8(load_bundle(tiny_checkpoint), torch.device("cpu"))
    assert "Turn fp8_base off" in refused.value.fix


def test_dreambooth_cannot_store_its_trained_unet_in_fp8(tmp_path):
    config = RunConfig(method="dreambooth")
    config.model.base, config.data.data, config.output.name, config.output.out = "x", "y", "z", str(tmp_path)
    config.dreambooth.instance_prompt, config.prior.class_prompt = "a photo of sks dog", "a photo of a dog"
    config.training.fp8_base = True
    with pytest.raises(ConfigError, match="DreamBooth .* trains the UNet.s own weights"):
        config.validate()


@pytest.mark.parametrize("method, family", [("lora", "sd1"), ("locon", "sd1"), ("textual_inversion", "sd1"),
                                            ("lora", "sdxl")])
def test_a_run_with_fp8_base_trains_and_exports(tiny_checkpoint, image_folder, tmp_path, method, family):
    from lib_sdcustom.testing.tiny_families import write_tiny_sdxl
    from lib_sdcustom.run.train import train

    config = RunConfig(method=method)
    base = tiny_checkpoint if family == "sd1" else write_tiny_sdxl(tmp_path / "model")
    config.model.base, config.data.data = str(base), str(image_folder)
    if family == "sdxl":  # the other path through the fp8 layers: autocast to bf16, recomputed activations
        config.training.mixed_precision, config.training.gradient_checkpointing = "bf16", True
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "fpeight", str(tmp_path / "out"), str(tmp_path / "run")
    config.output.save_precision = "fp32"
    config.training.steps, config.training.sample_steps, config.training.save_state_every = 4, 1, 0
    config.training.fp8_base = True
    config.optimizer.lr = 1e-3
    config.textual_inversion.init_text = "dog"

    result = train(config)

    assert result.outputs and result.outputs[0].is_file()
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
