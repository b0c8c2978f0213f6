"""Textual Inversion on tiny SD2 (v-prediction) and SDXL checkpoints: the host's file layouts per family (one
OpenCLIP-wide tensor for SD2; `clip_l` + `clip_g` for SDXL, in .safetensors and .pt), diffusers'
`load_textual_inversion` as an independent consumer giving the trainer's encodings, SDXL's pooled vector read
at the end token as the host reads it, initialisation through each encoder's own tokenizer, and the base's
tokenizers and embedding tables left exactly as they were."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import model_digest, write_images
from lib_sdcustom.config import RunConfig
from lib_sdcustom.errors import ConfigError, ModelLoadError
from lib_sdcustom.formats.embedding_file import classify_embedding, encoder_vectors, read_embedding, write_embedding
from lib_sdcustom.hashing import sha256_file
from lib_sdcustom.methods.textual_inversion import TextualInversionMethod
from lib_sdcustom.models.bundle import BaseIdentity
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.testing.tiny_families import (TINY_CLIP_L_TEXT_CONFIG, TINY_OPEN_CLIP_TEXT_CONFIG, write_tiny_sd2,
                                               write_tiny_sdxl)
from lib_sdcustom.run.context import RunContext
from lib_sdcustom.run.train import train
from test_textual_inversion import HOST_ZIP_ENTRY, HostUnpickler

TRIGGER = "sks-toy"
PROMPT = f"a photo of {TRIGGER} on a table"
VECTORS = 3
END_TOKEN = 49407
WIDTHS = {"sd2": (TINY_OPEN_CLIP_TEXT_CONFIG["hidden_size"],),
          "sdxl": (TINY_CLIP_L_TEXT_CONFIG["hidden_size"], TINY_OPEN_CLIP_TEXT_CONFIG["hidden_size"])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ti_families")
    return {"sd2": write_tiny_sd2(folder, v_prediction=True), "sdxl": write_tiny_sdxl(folder)}


def make_config(base: Path, images: Path, root: Path, *, steps: int = 3, fmt: str = "safetensors") -> RunConfig:
    config = RunConfig(method="textual_inversion")
    config.model.base = str(base)
    config.data.data = str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 64
    config.output.name, config.output.out, config.output.run_dir = TRIGGER, str(root / "out"), str(root / "run")
    config.textual_inversion.vectors, config.textual_inversion.init_text = VECTORS, "toy"
    config.textual_inversion.embedding_format = fmt
    config.optimizer.lr = 5e-2
    config.training.steps, config.training.sample_steps, config.training.save_state_every = steps, 1, steps
    config.training.keep_final_state = True  # the tests read the trainer's last weights from it
    return config


def trainer_method(base: Path, config: RunConfig, state: dict[str, torch.Tensor] | None = None) -> TextualInversionMethod:
    bundle = load_bundle(base)
    context = RunContext(config=config, bundle=bundle, training_set=None, data_folder=Path(config.data.data),
                         run_dir=Path(config.output.run_dir), trigger_phrase=config.output.name)
    method = TextualInversionMethod(context)
    if state is not None:
        method.load_trainable_state(state)
    return method


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(sorted((Path(run_dir) / "state").glob("step-*"))[-1] / "trainable.safetensors"))


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def trained(request, checkpoints, tmp_path_factory):
    """One short run per family; returns (family, base, config, result path)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"ti_{family}")
    config = make_config(checkpoints[family], write_images(root / "images"), root)
    result = train(config)
    return family, checkpoints[family], config, result.outputs[0]


# ----- diffusers as the independent consumer -----

def _diffusers_holder(tokenizer, text_encoder):
    """diffusers' TextualInversionLoaderMixin on a minimal holder (pipelines do not import beside transformers
    4.30.2, and the mixin is what every pipeline uses)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    class Holder(TextualInversionLoaderMixin):
        hf_device_map = None

        def __init__(self) -> None:
            self.tokenizer, self.text_encoder = tokenizer, text_encoder
            self.components = {"tokenizer": tokenizer, "text_encoder": text_encoder}

    return Holder()


def _ids(holder, prompt: str) -> torch.Tensor:
    tokenizer = holder.tokenizer
    return tokenizer(holder.maybe_convert_prompt(prompt, tokenizer), padding="max_length", max_length=77,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def diffusers_encoding(base: Path, path: Path, prompt: str):
    """(context, pooled) of `prompt` after diffusers loads the embedding into a fresh base: SD2 through its one
    encoder; SDXL with clip_l in text_encoder/tokenizer and clip_g in text_encoder_2/tokenizer_2, as diffusers
    documents. SDXL's pooled vector is read the host's way, at the end token (see the test)."""
    pytest.importorskip("diffusers")
    bundle = load_bundle(base)
    vectors = encoder_vectors(read_embedding(path))
    holders = [_diffusers_holder(tokenizer, encoder)
               for tokenizer, encoder in zip((bundle.tokenizer, bundle.tokenizer_2), bundle.text_encoders)]
    for holder, tensor in zip(holders, vectors):
        holder.load_textual_inversion(tensor, token=TRIGGER, tokenizer=holder.tokenizer, text_encoder=holder.text_encoder)
    if len(holders) == 1:
        return holders[0].text_encoder(_ids(holders[0], prompt))[0], None
    first_ids, second_ids = (_ids(holder, prompt) for holder in holders)
    first = holders[0].text_encoder(first_ids, output_hidden_states=True)
    second = holders[1].text_encoder(second_ids, output_hidden_states=True)
    end = (second_ids == END_TOKEN).int().argmax(dim=-1)
    pooled = holders[1].text_encoder.text_projection(second.last_hidden_state[torch.arange(len(end)), end])
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), pooled


# ----- tests -----

def test_file_is_the_hosts_layout_for_the_family(trained):
    family, base, config, path = trained
    assert path == Path(config.output.out) / f"{TRIGGER}.safetensors"
    data = read_embedding(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    state = final_state(config.output.run_dir)
    if family == "sd2":
        assert classify_embedding(data) == "single_tensor" and list(data) == ["emb_params"]
    else:
        assert classify_embedding(data) == "sdxl_dual" and sorted(data) == ["clip_g", "clip_l"]
    vectors = encoder_vectors(data)
    assert tuple(v.shape for v in vectors) == tuple((VECTORS, width) for width in WIDTHS[family])
    assert all(v.dtype == torch.float32 for v in vectors)
    for saved, key in zip(vectors, ("vectors", "vectors_2")):
        torch.testing.assert_close(saved, state[key], atol=0, rtol=0)
    assert metadata["name"] == TRIGGER and metadata["step"] == "3"
    assert metadata["sd_checkpoint"] == sha256_file(base)[:10]


def test_diffusers_loads_the_file_with_the_trainers_encodings(trained):
    family, base, config, path = trained
    method = trainer_method(base, config, final_state(config.output.run_dir))
    with torch.no_grad():
        expected = method.encode_captions([PROMPT])
        initial = trainer_method(base, config).encode_captions([PROMPT])
    context, pooled = diffusers_encoding(base, path, PROMPT)
    torch.testing.assert_close(context, expected.context, atol=1e-5, rtol=0)
    assert not torch.allclose(expected.context, initial.context, atol=1e-4), "the vectors must have learned"
    if family == "sdxl":
        torch.testing.assert_close(pooled, expected.pooled, atol=1e-5, rtol=0)
    else:
        assert expected.pooled is None


@torch.no_grad()
def test_sdxl_encoders_see_the_hosts_token_ids(checkpoints, image_folder, tmp_path):
    """The host tokenizes the prompt with each encoder's tokenizer and puts token 0 at the word's positions
    (`tokenize_line`), so open_clip's argmax pooling finds the end token. A placeholder id (above every
    real id) reaching the encoder would move SDXL's pooled vector onto the new word."""
    method = trainer_method(checkpoints["sdxl"], make_config(checkpoints["sdxl"], image_folder, tmp_path))
    bundle = method.bundle
    seen: list[torch.Tensor] = []
    handles = [encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
               for encoder in bundle.text_encoders]
    method.encode_captions([PROMPT])
    for handle in handles:
        handle.remove()
    for ids, tokenizer in zip(seen, (bundle.tokenizer, bundle.tokenizer_2)):
        before, after = (tokenizer(text, add_special_tokens=False).input_ids for text in PROMPT.split(TRIGGER))
        host = [tokenizer.bos_token_id, *before, *[0] * VECTORS, *after, END_TOKEN]
        host += [tokenizer.pad_token_id] * (77 - len(host))
        assert ids[0].tolist() == host
    assert [tokenizer.pad_token_id for tokenizer in (bundle.tokenizer, bundle.tokenizer_2)] == [END_TOKEN, 0]
    method.close()


@torch.no_grad()
def test_init_text_goes_through_each_encoders_own_tokenizer_and_table(checkpoints, image_folder, tmp_path):
    config = make_config(checkpoints["sdxl"], image_folder, tmp_path)
    config.textual_inversion.init_text = "red toy"
    method = trainer_method(checkpoints["sdxl"], config)
    bundle = method.bundle
    for vectors, tokenizer, encoder in zip(method.vectors, (bundle.tokenizer, bundle.tokenizer_2), bundle.text_encoders):
        ids = tokenizer("red toy", add_special_tokens=False).input_ids
        table = encoder.get_input_embeddings().weight
        torch.testing.assert_close(vectors.detach(), table[[ids[0], ids[0], ids[1]]], atol=0, rtol=0)
    method.close()


def test_training_leaves_tokenizers_tables_and_the_base_untouched(checkpoints, image_folder, tmp_path):
    for family, base in checkpoints.items():
        bundle = load_bundle(base)
        before = model_digest(bundle), [len(t) for t in (bundle.tokenizer, bundle.tokenizer_2) if t is not None]
        tables = [encoder.get_input_embeddings().weight.detach().clone() for encoder in bundle.text_encoders]
        second = tuple(encoder.state_dict() for encoder in bundle.text_encoders[1:])
        train(make_config(base, image_folder, tmp_path / family, steps=2), bundle=bundle)
        after = model_digest(bundle), [len(t) for t in (bundle.tokenizer, bundle.tokenizer_2) if t is not None]
        assert after == before, family
        for table, encoder in zip(tables, bundle.text_encoders):
            assert torch.equal(encoder.get_input_embeddings().weight, table)
            assert encoder.get_input_embeddings().weight.shape[0] == 49408
            assert not encoder.get_input_embeddings()._forward_hooks, "the hooks are removed after the run"
        for state, encoder in zip(second, bundle.text_encoders[1:]):
            assert all(torch.equal(value, encoder.state_dict()[key]) for key, value in state.items())


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_pt_file_passes_the_hosts_unpickler_in_the_familys_layout(family, checkpoints, image_folder, tmp_path):
    config = make_config(checkpoints[family], image_folder, tmp_path, steps=2, fmt="pt")
    path = train(config).outputs[0]
    assert path.suffix == ".pt"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert all(HOST_ZIP_ENTRY.match(name) for name in names), names
        HostUnpickler(archive.open(next(name for name in names if name.endswith("/data.pkl")))).load()
    data = read_embedding(path)
    state = final_state(config.output.run_dir)
    if family == "sd2":
        assert classify_embedding(data) == "a1111_dict" and data["name"] == TRIGGER
        assert data["string_to_param"]["*"].shape == (VECTORS, WIDTHS["sd2"][0])
    else:
        # The host turns every value of an SDXL dict into a tensor: nothing but the two tensors may be in it.
        assert classify_embedding(data) == "sdxl_dual" and sorted(data) == ["clip_g", "clip_l"]
    for saved, key in zip(encoder_vectors(data), ("vectors", "vectors_2")):
        torch.testing.assert_close(saved, state[key], atol=0, rtol=0)


def test_resuming_with_another_familys_state_is_refused(checkpoints, image_folder, tmp_path):
    method = trainer_method(checkpoints["sdxl"], make_config(checkpoints["sdxl"], image_folder, tmp_path))
    with pytest.raises(ConfigError, match="saved state holds vectors"):
        method.load_trainable_state({"vectors": torch.zeros(VECTORS, WIDTHS["sdxl"][0])})
    method.close()


def test_sdxl_files_the_host_would_fail_on_are_refused(tmp_path):
    pair = {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}
    assert classify_embedding(pair) == "sdxl_dual"
    with pytest.raises(ModelLoadError, match="not tensors"):
        classify_embedding({**pair, "name": "x"})  # the host calls .detach() on every value
    with pytest.raises(ModelLoadError, match="same number"):
        encoder_vectors({**pair, "clip_g": torch.zeros(3, 1280)})
    with pytest.raises(ValueError, match="same number of vectors"):
        write_embedding(tmp_path / "x.safetensors", [torch.zeros(2, 768), torch.zeros(3, 1280)], name="x", step=0,
                        base=BaseIdentity(name="base"), fmt="safetensors")


@torch.no_grad()
def test_placeholder_ids_passed_straight_in_give_the_same_hidden_states(checkpoints, image_folder, tmp_path):
    """The hook's second way in (used to sample with an embedding file): the layer swaps the ids itself."""
    method = trainer_method(checkpoints["sd2"], make_config(checkpoints["sd2"], image_folder, tmp_path))
    ids = method.tokenizers[0]([method.expand(PROMPT)], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert int(ids.max()) >= 49408
    direct = method.bundle.text_encoder(ids)[0]
    torch.testing.assert_close(direct, method.encode_captions([PROMPT]).context, atol=0, rtol=0)
    method.close()
