"""Pivotal tuning on tiny SD1, SD2 (v-prediction) and SDXL checkpoints: a few steps each, then the one LoRA file
is read the way the host reads it (tests/host_rules.py): every network module maps to a host module, the
`bundle_emb` keys give one word in the layout the host's embedding loader accepts, with the trainer's exact
vectors, and the file rebuilt on a fresh base gives the trainer's outputs for a prompt using the word."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_until_cancelled, write_images
from host_rules import host_bundled_embeddings, host_target_for
from lib_sdcustom.config import RunConfig
from lib_sdcustom.errors import ConfigError
from lib_sdcustom.formats.embedding_file import bundled_words, classify_embedding, encoder_vectors
from lib_sdcustom.formats.network_file import BUNDLE_PREFIX, read_network_file
from lib_sdcustom.host.base import StandaloneHost
from lib_sdcustom.methods.text_conditioning import encode_prompts
from lib_sdcustom.methods.textual_inversion import STATE_KEYS, LearnedWord
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.testing.tiny import write_tiny_sd1
from lib_sdcustom.testing.tiny_families import write_tiny_sd2, write_tiny_sdxl
from lib_sdcustom.networks.algorithms import algorithm_for
from lib_sdcustom.networks.kohya_names import from_file_names
from lib_sdcustom.networks.lycoris_backend import attach_network
from lib_sdcustom.run.train import train
from lib_sdcustom.training.conditioning import SizeConditioning
from test_sdxl_sd2_networks import host_layer_names as open_clip_host_names
from test_train_network import host_layer_names as sd1_host_names

FAMILIES = ("sd1", "sd2", "sdxl")
WORD = "zwx-toy"
PROMPT = f"a photo of {WORD} on a table"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> (base, exported file, config, trainer's final state)."""
    root = tmp_path_factory.mktemp("pivotal")
    images = write_images(root / "images")
    writers = {"sd1": lambda folder: write_tiny_sd1(folder), "sd2": lambda folder: write_tiny_sd2(folder, v_prediction=True),
               "sdxl": write_tiny_sdxl}
    runs = {}
    for family in FAMILIES:
        base = writers[family](root / family / "model")
        config = RunConfig(method="pivotal")
        config.model.base, config.data.data = str(base), str(images)
        config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
        config.output.name, config.output.out = WORD, str(root / family / "Lora")
        config.output.run_dir, config.output.save_precision = str(root / family / "run"), "fp32"
        config.network.rank, config.network.alpha = 4, 2.0
        config.textual_inversion.vectors, config.textual_inversion.init_text = 2, "toy"
        config.optimizer.lr = 5e-3
        config.training.steps, config.training.sample_steps, config.training.save_state_every = 3, 1, 0
        config.training.keep_final_state = True  # the trainer's last weights, to compare the file with
        result = train(config)
        state = load_file(str(sorted((Path(config.output.run_dir) / "state").glob("step-*"))[-1] / "trainable.safetensors"))
        runs[family] = (base, result.outputs[0], config, state)
    return runs


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """(network tensors, the word's vectors per text encoder) of a file or trainer state."""
    network = {key: value for key, value in tensors.items() if not key.startswith(BUNDLE_PREFIX)}
    return network, list(encoder_vectors(host_bundled_embeddings(tensors)[WORD]))


@torch.no_grad()
def outputs_with(base: Path, config: RunConfig, network: dict[str, torch.Tensor] | None, vectors: list[torch.Tensor] | None):
    """Context and UNet output for `PROMPT` on a fresh base, with the network and/or the word when given."""
    bundle = load_bundle(base)
    if network is not None:
        attached = attach_network(bundle.unet, bundle.text_encoders, algorithm_for("lora"), config.network,
                                  train_text_encoder=True)
        attached.load_state_dict(from_file_names(network, bundle.unet))
    if vectors is not None:
        word = LearnedWord(bundle, WORD, config.textual_inversion, seed=0)
        word.load_state(dict(zip(STATE_KEYS, vectors)))
        conditioning = word.encode([PROMPT], clip_skip=1)
    else:
        conditioning = encode_prompts(bundle, [PROMPT])
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    sizes = [SizeConditioning(original=(64, 64), crop=(0, 0), target=(64, 64))]
    bundle.unet.eval()
    return conditioning.context, bundle.unet(latents, torch.tensor([500]), **conditioning.unet_kwargs(sizes)).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_the_host_reads_one_word_with_the_trainers_vectors(trained, family):
    base, path, _, state = trained[family]
    tensors, _ = read_network_file(path)
    words = host_bundled_embeddings(tensors)
    assert list(words) == [WORD]
    assert classify_embedding(words[WORD]) == ("sdxl_dual" if family == "sdxl" else "a1111_dict")
    file_vectors, trainer_vectors = encoder_vectors(words[WORD]), split_state(state)[1]
    bundle = load_bundle(base)
    assert [tuple(v.shape) for v in file_vectors] == [(2, encoder.get_input_embeddings().embedding_dim)
                                                       for encoder in bundle.text_encoders]
    for got, want, ours in zip(file_vectors, trainer_vectors, bundled_words(tensors)[WORD]):
        assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(ours, got)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_network_module_maps_to_a_host_module(trained, family):
    base, path, _, _ = trained[family]
    bundle = load_bundle(base)
    names = sd1_host_names(bundle) if family == "sd1" else open_clip_host_names(bundle)
    network, _ = split_state(read_network_file(path)[0])
    modules = {key.split(".")[0] for key in network}
    assert modules and not sorted(m for m in modules if host_target_for(m, names) is None)
    assert {m.split("_")[1] for m in modules} == ({"unet", "te1", "te2"} if family == "sdxl" else {"unet", "te"})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_file_reloads_to_the_trainers_model_and_the_word_matters(trained, family):
    base, path, config, state = trained[family]
    expected = outputs_with(base, config, *split_state(state))
    reloaded = outputs_with(base, config, *split_state(read_network_file(path)[0]))
    for got, want in zip(reloaded, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    network_only = outputs_with(base, config, split_state(state)[0], None)
    assert not torch.allclose(network_only[0], expected[0]), "the word must change the prompt's conditioning"


def test_a_host_names_its_embeddings_folder_for_a_bundled_word(tmp_path):
    host = StandaloneHost(tmp_path / "models")
    config = RunConfig(method="pivotal")
    config.model.base, config.output.name = str(tmp_path / "models" / "base.safetensors"), WORD
    host.prepare(config)
    assert Path(config.output.embeddings_dir) == tmp_path.resolve() / "models" / "embeddings"
    config.output.embeddings_dir = str(tmp_path / "elsewhere")  # the page and API may name only the roots
    with pytest.raises(ConfigError, match=r"\[output\] embeddings_dir .* outside the folders"):
        host.check_paths(config)
    lora = RunConfig(method="lora")
    lora.model.base = config.model.base
    host.prepare(lora)
    assert lora.output.embeddings_dir == ""


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_checkpoint):
    images = write_images(tmp_path / "images")

    def config_in(folder: Path) -> RunConfig:
        config = RunConfig(method="pivotal")
        config.model.base, config.data.data = str(tiny_checkpoint), str(images)
        config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
        config.output.name, config.output.out, config.output.run_dir = WORD, str(folder / "Lora"), str(folder / "run")
        config.training.steps, config.training.sample_steps, config.training.save_state_every = 4, 1, 0
        config.training.keep_final_state = True
        return config

    def final(config: RunConfig) -> dict[str, torch.Tensor]:
        return load_file(str(sorted((Path(config.output.run_dir) / "state").glob("step-*"))[-1] / "trainable.safetensors"))

    whole = config_in(tmp_path / "whole")
    train(whole)
    halves = config_in(tmp_path / "halves")
    train_until_cancelled(halves, 2)
    train(halves, resume=Path(halves.output.run_dir))
    expected, resumed = final(whole), final(halves)
    assert expected.keys() == resumed.keys() and any(key.startswith(BUNDLE_PREFIX) for key in expected)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)


def test_the_network_waits_while_the_word_learns_alone(tmp_path, tiny_checkpoint):
    config = RunConfig(method="pivotal")
    config.model.base, config.data.data = str(tiny_checkpoint), str(write_images(tmp_path / "images"))
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = WORD, str(tmp_path / "Lora"), str(tmp_path / "run")
    config.training.steps, config.training.sample_steps, config.training.save_state_every = 2, 1, 0
    config.textual_inversion.word_first, config.textual_inversion.init_text = 0.9, "toy"  # the network joins at step 2 of 2
    tensors, _ = read_network_file(train(config).outputs[0])
    network, vectors = split_state(tensors)
    ups = [value for key, value in network.items() if key.endswith("lora_up.weight")]
    assert ups and all(float(up.abs().max()) == 0 for up in ups), "the LoRA starts at zero and must not have moved"
    base = load_bundle(tiny_checkpoint)
    start = LearnedWord(base, WORD, config.textual_inversion, seed=config.training.seed).vectors[0]
    assert not torch.equal(vectors[0], start.detach()), "the word must have learned"
