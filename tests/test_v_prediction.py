"""v-prediction and the other per-family training rules: the v target against a hand computation, min-SNR
for v, zero terminal SNR, a v checkpoint without its YAML, per-family resolutions, and SDXL's size/crop
conditioning from the data to the UNet."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_images
from lib_sdcustom.config import RunConfig
from lib_sdcustom.data.captions import CaptionOptions
from lib_sdcustom.data.dataset import BatchingOptions, TrainingSet, size_conditioning
from lib_sdcustom.data.scan import scan_dataset
from lib_sdcustom.errors import ConfigError, ModelLoadError
from lib_sdcustom.run.family_defaults import apply_family_defaults, native_resolution
from lib_sdcustom.models.bundle import ModelFamily
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.testing.tiny_families import write_tiny_sd2, write_tiny_sdxl
from lib_sdcustom.run.train import train
from lib_sdcustom.training import objectives
from lib_sdcustom.training.conditioning import Conditioning, SizeConditioning, time_ids


@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory):
    return write_tiny_sd2(tmp_path_factory.mktemp("sd2v"), name="sd2v", v_prediction=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def make_config(base: Path, images: Path, root: Path, *, steps: int = 2) -> RunConfig:
    config = RunConfig(method="lora")
    config.model.base, config.data.data = str(base), str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "vnet", str(root / "out"), str(root / "run")
    config.network.rank, config.network.alpha = 4, 4.0
    config.training.steps, config.training.sample_steps, config.training.save_state_every = steps, 1, 0
    return config


# ----- objectives -----

def test_v_target_matches_a_hand_computation():
    alphas_cumprod = torch.tensor([0.99, 0.64, 0.36])
    latents = torch.tensor([[1.0, -2.0]]).reshape(1, 2, 1, 1).repeat(2, 1, 1, 1)
    noise = torch.tensor([[2.0, 0.5]]).reshape(1, 2, 1, 1).repeat(2, 1, 1, 1)
    timesteps = torch.tensor([1, 2])
    target = objectives.training_target("v_prediction", latents, noise, timesteps, alphas_cumprod)
    # t=1: sqrt(a)=0.8, sqrt(1-a)=0.6 -> v = 0.8*eps - 0.6*x0; t=2: 0.6*eps - 0.8*x0
    expected = torch.tensor([[0.8 * 2 - 0.6 * 1, 0.8 * 0.5 + 0.6 * 2], [0.6 * 2 - 0.8 * 1, 0.6 * 0.5 + 0.8 * 2]])
    torch.testing.assert_close(target.reshape(2, 2), expected)
    assert torch.equal(objectives.training_target("epsilon", latents, noise, timesteps, alphas_cumprod), noise)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=3, trained_betas=[0.01, 1 - 0.64 / 0.99, 1 - 0.36 / 0.64], prediction_type="v_prediction")
    torch.testing.assert_close(scheduler.alphas_cumprod, alphas_cumprod)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))


def test_min_snr_weights_for_v_give_the_same_x0_weighting_as_for_epsilon():
    """min(SNR, gamma) x |x0 error|^2 is what both weightings mean; check it per sample."""
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([3, 200, 600, 990])
    noisy = objectives.add_noise(latents, noise, timesteps, alphas_cumprod)
    v_hat = torch.randn(4, 4, 8, 8, generator=generator)
    a = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    x0_hat = a.sqrt() * noisy - (1 - a).sqrt() * v_hat
    eps_hat = (1 - a).sqrt() * noisy + a.sqrt() * v_hat
    gamma = 5.0
    snr = objectives.snr(timesteps, alphas_cumprod)
    wanted = torch.clamp(snr, max=gamma) * objectives.per_sample_mse(x0_hat, latents)
    v_target = objectives.training_target("v_prediction", latents, noise, timesteps, alphas_cumprod)
    v_loss = objectives.min_snr_weights(timesteps, alphas_cumprod, gamma, "v_prediction") * objectives.per_sample_mse(v_hat, v_target)
    eps_loss = objectives.min_snr_weights(timesteps, alphas_cumprod, gamma, "epsilon") * objectives.per_sample_mse(eps_hat, noise)
    torch.testing.assert_close(v_loss, wanted, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(eps_loss, wanted, rtol=1e-4, atol=1e-6)


def test_zero_terminal_snr_rescale_matches_diffusers():
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    from lib_sdcustom.models.model_yaml import ddpm_scheduler

    scheduler = DDPMScheduler(**ddpm_scheduler(1000, 0.00085, 0.012, "v_prediction"))
    ours = objectives.rescale_zero_terminal_snr(scheduler.alphas_cumprod)
    theirs = torch.cumprod(1 - rescale_zero_terminal_snr(scheduler.betas), dim=0)
    assert ours[-1] == 0 and ours[0] == pytest.approx(float(scheduler.alphas_cumprod[0]))
    assert bool((ours[1:] <= ours[:-1]).all())
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-6, rtol=1e-5)
    weights = objectives.min_snr_weights(torch.tensor([999]), ours, 5.0, "v_prediction")
    assert torch.equal(weights, torch.zeros(1)), "pure noise gets weight 0 for v, not a division by 0"


# ----- the loop trains the target the model predicts -----

def test_v_model_trains_on_v_targets_and_zero_terminal_snr(sd2_v, tmp_path, monkeypatch):
    seen = []
    real = objectives.training_target

    def recording(prediction_type, latents, noise, timesteps, alphas_cumprod):
        seen.append((prediction_type, float(alphas_cumprod[-1])))
        return real(prediction_type, latents, noise, timesteps, alphas_cumprod)

    monkeypatch.setattr(objectives, "training_target", recording)
    images = write_images(tmp_path / "images")
    config = make_config(sd2_v, images, tmp_path / "plain")
    train(config)
    assert seen and all(kind == "v_prediction" and last > 0 for kind, last in seen)
    seen.clear()
    config = make_config(sd2_v, images, tmp_path / "ztsnr")
    config.training.zero_terminal_snr, config.training.min_snr_gamma = True, 5.0
    result = train(config)
    assert seen and all(kind == "v_prediction" and last == 0 for kind, last in seen)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    from lib_sdcustom.formats.network_file import read_network_file

    metadata = read_network_file(result.outputs[0])[1]
    assert (metadata["ss_zero_terminal_snr"], metadata["ss_base_model_version"]) == ("True", "sd_v2_v")


def test_zero_terminal_snr_is_refused_for_a_noise_predicting_model(sdxl, tmp_path):
    config = make_config(sdxl, write_images(tmp_path / "images"), tmp_path)
    config.training.zero_terminal_snr = True
    with pytest.raises(ConfigError, match="predicts noise") as raised:
        train(config)
    assert "v-prediction" in raised.value.fix
    assert not (tmp_path / "out").exists()


def test_v_checkpoint_without_its_yaml_asks_for_one_before_training(sd2_v, tmp_path):
    bare = tmp_path / "bare_v.safetensors"
    save_file(load_file(str(sd2_v)), str(bare))  # the same weights, no NAME.yaml beside them
    config = make_config(bare, write_images(tmp_path / "images"), tmp_path)
    with pytest.raises(ModelLoadError) as raised:
        train(config)
    assert "SD2" in raised.value.problem and "bare_v.yaml" in raised.value.fix
    assert "v2-inference-v.yaml" in raised.value.fix
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
    shutil.copyfile(sd2_v.with_suffix(".yaml"), bare.with_suffix(".yaml"))  # the fix the message names works
    assert load_bundle(bare).prediction_type == "v_prediction"


# ----- per-family defaults -----

def test_resolution_left_at_the_default_follows_the_family(sd2_v, sdxl, tmp_path):
    assert native_resolution(ModelFamily.SD1, "epsilon") == 512
    assert native_resolution(ModelFamily.SD2, "epsilon") == 512
    bundle = load_bundle(sdxl)
    config = RunConfig(method="lora")
    config.model.base, config.data.data, config.output.name, config.output.out = str(sdxl), "d", "n", "o"
    changed, notes = apply_family_defaults(config, bundle)
    assert (changed.data.resolution, *changed.data.bucket_bounds) == (1024, 512, 2048)
    assert config.data.resolution == 512, "the caller's config is not modified"
    assert "1024" in notes[0] and "--resolution" in notes[0] and "--noise-offset 0.0357" in notes[1]
    changed, notes = apply_family_defaults(changed, load_bundle(sd2_v))
    assert changed.data.resolution == 1024 and not notes, "a chosen resolution stays"
    config.data.resolution = 512
    sd2_bundle = load_bundle(sd2_v)
    tiny_size = sd2_bundle.ldm_config["model"]["params"].pop("image_size")  # a YAML stating no size: the family's
    sd2_changed, _ = apply_family_defaults(config, sd2_bundle)
    assert (sd2_changed.data.resolution, *sd2_changed.data.bucket_bounds) == (768, 384, 1536)
    sd2_bundle.ldm_config["model"]["params"]["image_size"] = tiny_size  # the tiny model's YAML: 8 latents, 64 px
    sized, notes = apply_family_defaults(config, sd2_bundle)
    assert (sized.data.resolution, *sized.data.bucket_bounds) == (64, 64, 128) and "trained at 64 px" in notes[0]


# ----- SDXL size and crop conditioning -----

def test_size_conditioning_follows_the_crop_and_flip():
    # 100x80 (w x h) into a 64x64 bucket: scaled to 80x64, 16 px to spare across, centre crop at left 8.
    assert size_conditioning((100, 80), (64, 64)) == SizeConditioning(original=(80, 100), crop=(0, 8), target=(64, 64))
    flipped = size_conditioning((120, 80), (64, 64), flip=True)  # scaled to 96x64, centre left 16, mirrored 16
    assert flipped.crop == (0, 16)
    random_crop = size_conditioning((120, 80), (64, 64), crop_seed=3)
    assert random_crop == size_conditioning((120, 80), (64, 64), crop_seed=3)
    mirrored = size_conditioning((120, 80), (64, 64), crop_seed=3, flip=True)
    assert mirrored.crop[1] == 96 - 64 - random_crop.crop[1]
    assert time_ids([random_crop]).tolist() == [[80.0, 120.0, 0.0, float(random_crop.crop[1]), 64.0, 64.0]]


def test_batches_carry_each_pictures_size_to_the_sdxl_unet(sdxl, tmp_path, monkeypatch):
    from PIL import Image

    from lib_sdcustom.training.batches import LatentBatchSource

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (96, 72), "red").save(images / "wide.png")
    scan = scan_dataset(images, caption_extension=".txt", default_repeats=1, default_caption="x")
    training_set = TrainingSet(scan, BatchingOptions(resolution=64, buckets=False, captions=CaptionOptions()))
    bundle = load_bundle(sdxl)
    source = LatentBatchSource(training_set, bundle, None)
    batch = source.batch(0)
    assert batch.sizes == [SizeConditioning(original=(72, 96), crop=(0, 10), target=(64, 64))]  # 96x72 -> 85x64, 21 px spare

    calls = []
    real_forward = type(bundle.unet).forward

    def recording(unet, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        calls.append(added_cond_kwargs)
        return real_forward(unet, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(type(bundle.unet), "forward", recording)
    config = make_config(sdxl, images, tmp_path, steps=1)
    config.data.buckets = False
    train(config, bundle=bundle)
    trained = calls[0]  # the first UNet call is the training step; previews follow
    assert trained["time_ids"].tolist() == [[72.0, 96.0, 0.0, 10.0, 64.0, 64.0]]
    assert trained["text_embeds"].shape == (1, bundle.text_encoder_2.config.projection_dim)
    assert calls[-1]["time_ids"][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]  # preview: uncropped


def test_conditioning_batches_and_moves_every_part():
    a = Conditioning(torch.zeros(1, 3, 4), torch.zeros(1, 2))
    b = Conditioning(torch.ones(1, 3, 4), torch.ones(1, 2))
    both = Conditioning.cat([a, b]).to(torch.float16)
    assert len(both) == 2 and both.context.dtype == both.pooled.dtype == torch.float16
    kwargs = both.unet_kwargs([SizeConditioning.uncropped(64, 32)] * 2)
    assert kwargs["added_cond_kwargs"]["time_ids"].dtype == torch.float16
    assert kwargs["added_cond_kwargs"]["time_ids"][1].tolist() == [64, 32, 0, 0, 64, 32]
    with pytest.raises(ValueError, match="one SizeConditioning per sample"):
        both.unet_kwargs(None)
    assert Conditioning(torch.zeros(1, 3, 4)).unet_kwargs(None).keys() == {"encoder_hidden_states"}


# ----- text conditioning per family -----

@torch.no_grad()
def test_sdxl_conditioning_equals_diffusers_encode_prompt(sdxl):
    try:
        from diffusers import StableDiffusionXLPipeline
    except Exception as error:  # pipelines do not import beside transformers 4.30.2
        pytest.skip(f"diffusers pipelines unavailable here: {error}")
    from lib_sdcustom.methods.text_conditioning import encode_prompts

    bundle = load_bundle(sdxl)
    pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2,
                                     tokenizer=bundle.tokenizer, tokenizer_2=bundle.tokenizer_2, unet=bundle.unet,
                                     scheduler=bundle.noise_scheduler)
    prompts = ["a photo of a red toy", "x"]
    context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    ours = encode_prompts(bundle, prompts)
    torch.testing.assert_close(ours.context, context, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-6, rtol=0)


@torch.no_grad()
def test_clip_skip_applies_to_sd1_only_as_in_the_host(sd2_v, tiny_checkpoint):
    from lib_sdcustom.methods.text_conditioning import encode_prompts

    sd2 = load_bundle(sd2_v)
    assert torch.equal(encode_prompts(sd2, ["a toy"], 2).context, encode_prompts(sd2, ["a toy"], 1).context)
    sd1 = load_bundle(tiny_checkpoint)
    assert not torch.equal(encode_prompts(sd1, ["a toy"], 2).context, encode_prompts(sd1, ["a toy"], 1).context)
