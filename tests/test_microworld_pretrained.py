"""The bundled micro-world model: it loads like any user checkpoint, draws what its captions say, and a LoRA
trained by our `train()` really teaches it a shape it has never seen."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lib_sdcustom.microworld.judge import load_judge
from lib_sdcustom.microworld.model import BASE_NAME, MICRO_TEXT_CONFIG, shipped_checkpoint
from lib_sdcustom.microworld.quality import caption_scenes, reconstruction_accuracy, sample_quality
from lib_sdcustom.microworld.teach import prompts_for, sampler, subject_hits, trained_sampler
from lib_sdcustom.microworld.world import CONCEPTS
from lib_sdcustom.models.bundle import ModelFamily
from lib_sdcustom.models.loader import load_bundle


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(shipped_checkpoint())


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_shipped_model_is_an_sd1_checkpoint_within_its_size_budget(bundle):
    path = shipped_checkpoint()
    assert path.stat().st_size < 10_000_000
    assert bundle.family is ModelFamily.SD1 and bundle.identity.name == BASE_NAME
    with safe_open(str(path), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys() if "diffusion_model" in key} == {torch.float16}
        record = json.loads(handle.metadata()["sdcustom_microworld"])
    assert record["unet_steps"] > 0 and record["vae_steps"] > 0
    assert 0.9e6 < sum(p.numel() for p in bundle.unet.parameters()) < 1.3e6
    text = bundle.text_encoder.config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers) == (49408, 64, MICRO_TEXT_CONFIG["num_hidden_layers"])
    with torch.no_grad():
        latents = bundle.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_vae_reconstructions_keep_what_the_judge_reads(bundle, judge):
    scores = reconstruction_accuracy(bundle.vae, judge, n=100, seed=77)
    assert scores["shape"] >= 0.9 and scores["color"] >= 0.9 and scores["background"] >= 0.95, scores


def test_samples_follow_their_captions(bundle, judge):
    scenes = caption_scenes()[::9]  # 24 of the 211 combinations, every shape and color among them
    assert {scene.shape for scene in scenes} == {scene.shape for scene in caption_scenes()}
    report, images = sample_quality(bundle, judge, per_caption=1, seed=5, scenes=scenes)
    assert len(images) == len(scenes)
    assert report.accuracy["color"] >= 0.9 and report.accuracy["background"] >= 0.9, report.accuracy
    assert report.accuracy["shape"] >= 0.8, report.accuracy


def test_a_lora_teaches_the_base_model_a_shape_it_never_saw(tmp_path, judge):
    from lib_sdcustom.demo import demo_config
    from lib_sdcustom.run.train import train

    concept = CONCEPTS["heart"]
    prompt = prompts_for(concept, "lora").subject
    config = demo_config(tmp_path)
    config.training.sample_steps = 2
    before = sampler(load_bundle(shipped_checkpoint()))([prompt] * 16, 1000)
    base_fidelity = sum(subject_hits(judge, before, concept)) / 16
    result = train(config)
    after = trained_sampler(config, result.outputs[0])([prompt] * 16, 1000)
    fidelity = sum(subject_hits(judge, after, concept)) / 16
    assert base_fidelity <= 0.2, base_fidelity
    assert fidelity >= 0.6, (base_fidelity, fidelity)


def test_pretrain_command_writes_a_checkpoint_the_loader_reads(tmp_path):
    from lib_sdcustom.microworld.__main__ import main

    assert main(["pretrain", str(tmp_path), "--vae-steps", "2", "--unet-steps", "2", "--pool-size", "64",
                 "--eval-samples", "0", "--name", "mini"]) == 0
    loaded = load_bundle(tmp_path / "mini.safetensors")
    assert (tmp_path / "mini_text_encoder" / "config.json").is_file()
    assert 0.01 < loaded.vae_scaling_factor < 100
    assert main(["pretrain", str(tmp_path), "--vae-steps", "2", "--unet-steps", "2", "--name", "mini"]) == 2
