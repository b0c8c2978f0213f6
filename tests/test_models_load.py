"""Loading a base model outside the host, and writing it back: exact round trip, working modules, and clear
messages for every file a user might point at by mistake."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lib_sdcustom.errors import ModelLoadError
from lib_sdcustom.hashing import legacy_model_hash, sha256_file
from lib_sdcustom.models.bundle import ModelFamily
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.models.writer import bundle_to_ldm_state_dict
from lib_sdcustom.testing.tiny import write_tiny_sd1

pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """The session's tiny checkpoint (tests/conftest.py), read only."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def bundle(tiny):
    return load_bundle(tiny)


def _assert_same(written, original):
    assert set(written) == set(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype, key
        assert torch.equal(written[key], tensor), key


def test_round_trip_is_bit_identical_fp32(tiny, bundle):
    _assert_same(bundle_to_ldm_state_dict(bundle), load_file(str(tiny)))


def test_round_trip_is_bit_identical_fp16(tmp_path):
    path = write_tiny_sd1(tmp_path, name="half", dtype=torch.float16)
    original = load_file(str(path))
    assert original["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    _assert_same(bundle_to_ldm_state_dict(load_bundle(path, dtype=torch.float16)), original)
    # Loaded in fp32 for training, the fp16 values survive exactly and cast back to the same bits.
    widened = bundle_to_ldm_state_dict(load_bundle(path))
    assert widened["model.diffusion_model.out.2.weight"].dtype == torch.float32
    _assert_same({k: v.half() if v.is_floating_point() else v for k, v in widened.items()}, original)


def test_saver_takes_replacement_weights(bundle):
    unet_sd = {key: torch.zeros_like(value) for key, value in bundle.unet.state_dict().items()}
    text_sd = {key.replace("text_model.", "", 1): value for key, value in bundle.text_encoder.state_dict().items()}
    saved = bundle_to_ldm_state_dict(bundle, unet_sd=unet_sd, text_encoder_sd=text_sd)
    assert not saved["model.diffusion_model.input_blocks.1.1.proj_in.weight"].any()
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in saved


def test_tiny_bundle_runs_with_sd_shapes(tiny, bundle):
    assert bundle.family is ModelFamily.SD1
    assert bundle.prediction_type == "epsilon"
    assert bundle.vae_scaling_factor == pytest.approx(0.18215)
    assert bundle.noise_scheduler.config.num_train_timesteps == 1000
    assert bundle.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert bundle.identity.name == "tiny"
    assert bundle.identity.sha256 == sha256_file(tiny)
    assert bundle.identity.legacy_hash == legacy_model_hash(tiny)
    assert bundle.ldm_config["model"]["params"]["unet_config"]["params"]["model_channels"] == 32
    assert set(bundle.ldm_extras) == {"alphas_cumprod",
                                      "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    processors = {type(p).__name__ for p in bundle.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}

    ids = bundle.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    assert ids[0, 0].item() == 49406
    with torch.no_grad():
        latents = bundle.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.sample()
        assert latents.shape == (1, 4, 8, 8)
        hidden = bundle.text_encoder(ids)[0]
        assert hidden.shape == (1, 77, 64)
        noise_pred = bundle.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample
        assert noise_pred.shape == latents.shape and torch.isfinite(noise_pred).all()
        assert bundle.vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_ckpt_with_state_dict_wrapper_loads(tiny, tmp_path):
    target = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": load_file(str(tiny)), "epoch": 3, "global_step": 10}, target)
    shutil.copyfile(tiny.with_suffix(".yaml"), tmp_path / "wrapped.yaml")
    _assert_same(bundle_to_ldm_state_dict(load_bundle(target)), load_file(str(tiny)))


class Payload:
    """Stands for any pickled object; a weights-only load must refuse it."""


def test_ckpt_with_pickled_object_is_refused(tiny, tmp_path):
    target = tmp_path / "evil.ckpt"
    torch.save({"state_dict": load_file(str(tiny)), "callback": Payload()}, target)
    with pytest.raises(ModelLoadError) as raised:
        load_bundle(target)
    assert "evil.ckpt" in raised.value.problem and "refused" in raised.value.problem
    assert ".safetensors" in raised.value.fix


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_bundle(tmp_path / "nope.safetensors")


def test_random_safetensors_is_not_a_checkpoint(tmp_path):
    target = tmp_path / "random.safetensors"
    save_file({"backbone.layer1.weight": torch.randn(4, 4), "head.bias": torch.zeros(4)}, str(target))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_bundle(target)


def test_lora_given_as_base_says_so(tmp_path):
    target = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(target))
    with pytest.raises(ModelLoadError, match="LoRA"):
        load_bundle(target)


def test_stock_config_mismatch_asks_for_a_yaml(tiny, tmp_path):
    target = tmp_path / "custom.safetensors"
    shutil.copyfile(tiny, target)
    with pytest.raises(ModelLoadError) as raised:
        load_bundle(target)
    assert "v1-inference" in raised.value.problem
    assert "custom.yaml" in raised.value.fix


def test_yaml_mismatch_names_the_yaml(tiny, tmp_path):
    import yaml

    target = tmp_path / "odd.safetensors"
    shutil.copyfile(tiny, target)
    config = yaml.safe_load(tiny.with_suffix(".yaml").read_text())
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 32
    (tmp_path / "odd.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelLoadError) as raised:
        load_bundle(target)
    assert "odd.yaml" in raised.value.problem and "wrong shape" in raised.value.problem


def test_diffusers_folder_loads(bundle, tmp_path):
    from lib_sdcustom.models.tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir

    folder = tmp_path / "pipe"
    bundle.unet.save_pretrained(str(folder / "unet"))
    bundle.vae.save_pretrained(str(folder / "vae"))
    bundle.text_encoder.save_pretrained(str(folder / "text_encoder"))
    (folder / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(bundled_tokenizer_dir() / name, folder / "tokenizer" / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    loaded = load_bundle(folder)
    assert loaded.family is ModelFamily.SD1 and loaded.identity.name == "pipe"
    assert loaded.noise_scheduler.config.beta_end == pytest.approx(0.012)
    assert loaded.ldm_extras == {}
    original = {k: v for k, v in bundle_to_ldm_state_dict(bundle).items() if k not in bundle.ldm_extras}
    _assert_same(bundle_to_ldm_state_dict(loaded), original)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_bundle(tmp_path)


def test_tensor_by_tensor_reading_gives_the_files_tensors_in_the_wanted_dtype(tiny):
    from lib_sdcustom.models.checkpoint_io import read_checkpoint

    original = load_file(str(tiny))
    _assert_same(read_checkpoint(tiny), original)
    halved = read_checkpoint(tiny, dtype=torch.bfloat16)
    _assert_same(halved, {key: value.to(torch.bfloat16) if value.is_floating_point() else value
                          for key, value in original.items()})
    loaded = load_bundle(tiny, dtype=torch.bfloat16, device="cpu")
    assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.bfloat16


def test_a_truncated_safetensors_file_is_reported_as_damaged(tiny, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = tiny.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="cut off"):
        load_bundle(cut)
