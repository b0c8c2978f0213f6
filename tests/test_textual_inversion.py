"""Textual Inversion end to end on the tiny checkpoint: the CLI, the host's file layouts, diffusers as an
independent loader, learning, the base left untouched, and bad input refused before anything is written."""

from __future__ import annotations

import importlib.util
import logging
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import model_digest, train_until_cancelled, write_images
from lib_sdcustom.cli import main
from lib_sdcustom.config import RunConfig
from lib_sdcustom.events import SamplesRendered
from lib_sdcustom.formats.embedding_file import classify_embedding, embedding_vectors, read_embedding
from lib_sdcustom.hashing import sha256_file
from lib_sdcustom.methods.textual_inversion import TemplatedSource, TextualInversionMethod
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.run.context import RunContext
from lib_sdcustom.run.train import train
from lib_sdcustom.training.batches import Batch

TRIGGER = "sks-toy"
PROMPT = f"a photo of {TRIGGER} on a table"
# The host's `modules/safe.py` (A1111 1.10): allowed zip entries and unpickler globals
# (docs/host-formats.md#extension-loading).
HOST_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
HOST_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
    ("torch", "IntStorage"), ("torch", "LongStorage"), ("torch", "DoubleStorage"), ("torch", "ByteStorage"),
    ("torch", "float32"), ("torch", "BFloat16Storage"), ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"),
    ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}
COMMON = ["--resolution", "64", "--min-bucket", "64", "--max-bucket", "128", "--sample-steps", "1", "--quiet"]


def make_config(tiny_checkpoint: Path, images: Path, root: Path, *, steps: int = 6, fmt: str = "safetensors") -> RunConfig:
    config = RunConfig(method="textual_inversion")
    config.model.base = str(tiny_checkpoint)
    config.data.data = str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = TRIGGER, str(root / "out"), str(root / "run")
    config.textual_inversion.vectors, config.textual_inversion.init_text = 3, "toy"
    config.textual_inversion.embedding_format = fmt
    config.training.steps, config.training.sample_steps, config.training.save_state_every = steps, 1, 0
    config.training.keep_final_state = True  # the tests read the trainer's last weights from it
    return config


def final_state(run_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(sorted((Path(run_dir) / "state").glob("step-*"))[-1] / "trainable.safetensors"))["vectors"]


def trainer_method(tiny_checkpoint: Path, config: RunConfig, vectors: torch.Tensor | None = None) -> TextualInversionMethod:
    """The trainer's own text conditioning, on a fresh base, with the given vectors."""
    bundle = load_bundle(tiny_checkpoint)
    context = RunContext(config=config, bundle=bundle, training_set=None, data_folder=Path(config.data.data),
                         run_dir=Path(config.output.run_dir), trigger_phrase=config.output.name)
    method = TextualInversionMethod(context)
    if vectors is not None:
        method.load_trainable_state({"vectors": vectors})
    return method


@torch.no_grad()
def diffusers_encoding(tiny_checkpoint: Path, path: Path, prompt: str, token: str | None) -> torch.Tensor:
    """Load `path` with diffusers' `load_textual_inversion` into a pipeline built from the same checkpoint
    and encode `prompt` as the pipeline does. Pipelines do not import beside transformers 4.30.2; there the
    same loader mixin runs on a minimal holder, and the prompt goes through its own `maybe_convert_prompt`."""
    base = load_bundle(tiny_checkpoint)
    try:
        from diffusers import StableDiffusionPipeline
    except Exception:  # transformers 4.30.2
        from diffusers.loaders import TextualInversionLoaderMixin

        class Holder(TextualInversionLoaderMixin):
            hf_device_map = None

            def __init__(self) -> None:
                self.tokenizer, self.text_encoder = base.tokenizer, base.text_encoder
                self.components = {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}

        holder = Holder()
        holder.load_textual_inversion(str(path), token=token)
        ids = holder.tokenizer(holder.maybe_convert_prompt(prompt, holder.tokenizer), padding="max_length",
                               max_length=77, truncation=True, return_tensors="pt").input_ids
        return holder.text_encoder(ids)[0]
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                   scheduler=base.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token=token)
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


class HostUnpickler(pickle.Unpickler):
    """Only the globals the host's restricted unpickler allows; tensors are not rebuilt."""

    def persistent_load(self, saved_id):
        return None

    def find_class(self, module: str, name: str):
        if (module, name) not in HOST_GLOBALS:
            raise pickle.UnpicklingError(f"the host forbids global {module}/{name}")
        return lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def cli_run(tiny_checkpoint, tmp_path_factory):
    """One CLI run shared by the format and loader checks: 3 vectors from 'toy', object templates."""
    root = tmp_path_factory.mktemp("ti_cli")
    images = write_images(root / "images")
    code = main(["train", "--method", "textual_inversion", "--base", str(tiny_checkpoint), "--data", str(images),
                 "--name", TRIGGER, "--out", str(root / "out"), "--run-dir", str(root / "run"), "--vectors", "3",
                 "--init-text", "toy", "--template", "object", "--steps", "12", "--save-every", "5",
                 "--keep-final-state", *COMMON])  # the checks read the trainer's last vectors from the state
    assert code == 0
    return root, make_config(tiny_checkpoint, images, root)


def test_cli_writes_the_embedding_and_keeps_intermediates_out_of_the_hosts_folder(cli_run):
    root, _ = cli_run
    out = root / "out"
    assert files_in(out) == [out / f"{TRIGGER}.preview.png", out / f"{TRIGGER}.safetensors"]
    # The host loads every file under embeddings/ recursively, so intermediates live in the run folder.
    assert sorted(p.name for p in (root / "run" / "embeddings").iterdir()) == [f"{TRIGGER}-10.safetensors", f"{TRIGGER}-5.safetensors"]
    intermediate = read_embedding(root / "run" / "embeddings" / f"{TRIGGER}-5.safetensors")
    assert classify_embedding(intermediate) == "single_tensor"


def test_safetensors_file_is_the_hosts_single_tensor_layout(cli_run, tiny_checkpoint):
    root, _ = cli_run
    path = root / "out" / f"{TRIGGER}.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        assert handle.get_tensor("emb_params").shape == (3, 64)  # [vectors, text-encoder width]
        assert handle.get_tensor("emb_params").dtype == torch.float32
        metadata = handle.metadata()
    data = read_embedding(path)
    assert classify_embedding(data) == "single_tensor"
    assert metadata["name"] == TRIGGER and metadata["step"] == "12"
    assert metadata["sd_checkpoint"] == sha256_file(tiny_checkpoint)[:10]
    torch.testing.assert_close(embedding_vectors(data), final_state(root / "run"), atol=0, rtol=0)


def test_diffusers_loads_the_file_with_the_trainers_text_encoding(cli_run, tiny_checkpoint):
    pytest.importorskip("diffusers")
    root, config = cli_run
    path = root / "out" / f"{TRIGGER}.safetensors"
    method = trainer_method(tiny_checkpoint, config, final_state(root / "run"))
    with torch.no_grad():
        expected = method.encode_captions([PROMPT]).context
        plain = method.encode_captions([PROMPT.replace(TRIGGER, "toy")]).context
    loaded = diffusers_encoding(tiny_checkpoint, path, PROMPT, token=TRIGGER)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, plain, atol=1e-3), "the trained vectors must differ from their init word"


def test_pt_file_is_the_hosts_own_dict_and_passes_its_safe_unpickler(tiny_checkpoint, image_folder, tmp_path):
    config = make_config(tiny_checkpoint, image_folder, tmp_path, steps=4, fmt="pt")
    result = train(config)
    path = tmp_path / "out" / f"{TRIGGER}.pt"
    assert result.outputs[0] == path
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert all(HOST_ZIP_ENTRY.match(name) for name in names), names
        pickled = next(name for name in names if name.endswith("/data.pkl"))
        HostUnpickler(archive.open(pickled)).load()
    data = read_embedding(path)
    assert classify_embedding(data) == "a1111_dict"
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and list(data["string_to_param"]) == ["*"]
    assert data["name"] == TRIGGER and data["step"] == 4
    assert data["sd_checkpoint"] == sha256_file(tiny_checkpoint)[:10] and data["sd_checkpoint_name"] == "tiny"
    assert type(data["string_to_param"]["*"]) is torch.Tensor and data["string_to_param"]["*"].shape == (3, 64)
    torch.testing.assert_close(embedding_vectors(data), final_state(tmp_path / "run"), atol=0, rtol=0)
    if importlib.util.find_spec("diffusers"):
        method = trainer_method(tiny_checkpoint, config, final_state(tmp_path / "run"))
        with torch.no_grad():
            expected = method.encode_captions([PROMPT]).context
        # No token given: diffusers takes it from the dict's `name`, which is the stem.
        torch.testing.assert_close(diffusers_encoding(tiny_checkpoint, path, PROMPT, token=None), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def fixed_eval_loss(bundle, pixels: torch.Tensor, conditioning: torch.Tensor) -> float:
    """Diffusion loss on one image with fixed noise at fixed timesteps, so only the conditioning varies."""
    from lib_sdcustom.training import objectives

    latents = bundle.vae.encode(pixels[None]).latent_dist.mode() * bundle.vae_scaling_factor
    latents = latents.repeat(8, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.linspace(50, 950, 8).long()
    noisy = objectives.add_noise(latents, noise, timesteps, bundle.noise_scheduler.alphas_cumprod)
    prediction = bundle.unet(noisy, timesteps, conditioning.expand(8, -1, -1)).sample
    return float(objectives.per_sample_mse(prediction, noise).mean())


def test_loss_falls_while_the_base_stays_bit_identical(tiny_checkpoint, image_folder, tmp_path):
    from lib_sdcustom.data.buckets import image_to_tensor
    from lib_sdcustom.data.images import load_rgb

    one = tmp_path / "one"
    one.mkdir()
    (one / "only.png").write_bytes((image_folder / "img0.png").read_bytes())
    config = make_config(tiny_checkpoint, one, tmp_path, steps=40)
    config.optimizer.lr = 5e-2
    config.textual_inversion.template = "captions"  # one fixed prompt: the trigger word alone
    bundle = load_bundle(tiny_checkpoint)
    embedding = bundle.text_encoder.get_input_embeddings()
    before_digest, table_rows, vocabulary = model_digest(bundle), embedding.num_embeddings, len(bundle.tokenizer)
    table = embedding.weight.detach().clone()

    train(config, bundle=bundle)

    assert model_digest(bundle) == before_digest, "UNet, VAE and text encoder (all token rows) must be unchanged"
    embedding = bundle.text_encoder.get_input_embeddings()
    assert embedding.num_embeddings == table_rows and len(bundle.tokenizer) == vocabulary
    assert torch.equal(embedding.weight, table)
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks, "close() must remove the hooks"

    pixels = image_to_tensor(load_rgb(one / "only.png"), (64, 64), flip=False)
    initial = trainer_method(tiny_checkpoint, config)
    trained = trainer_method(tiny_checkpoint, config, final_state(tmp_path / "run"))
    with torch.no_grad():
        before = fixed_eval_loss(initial.bundle, pixels, initial.encode_captions([TRIGGER]).context)
        after = fixed_eval_loss(trained.bundle, pixels, trained.encode_captions([TRIGGER]).context)
    # A tiny random UNet barely listens to its conditioning: even a free 77-token context tensor, optimised
    # on this fixed batch, lowers the loss by only ~7%, and three vectors by ~1%; 40 steps reach ~0.4%.
    assert after < before - 2e-3, (before, after)


def test_max_norm_clamps_every_vector_and_previews_use_the_trigger_word(tiny_checkpoint, image_folder, tmp_path):
    config = make_config(tiny_checkpoint, image_folder, tmp_path, steps=3)
    config.textual_inversion.init_text = ""  # random start, norms well above the clamp
    config.textual_inversion.max_norm = 0.05
    config.optimizer.lr = 0.1
    config.training.sample_every = 2
    events = []
    path = train(config, callbacks=[events.append]).outputs[0]
    assert [(e.step, e.prompt) for e in events if isinstance(e, SamplesRendered)] == [(2, TRIGGER), (3, TRIGGER)]
    norms = embedding_vectors(read_embedding(path)).norm(dim=1)
    assert torch.all(norms <= 0.05 + 1e-6) and torch.all(norms > 0.04), norms


def test_init_text_sets_the_start_and_a_long_one_is_truncated_with_a_warning(tiny_checkpoint, image_folder, tmp_path, caplog):
    config = make_config(tiny_checkpoint, image_folder, tmp_path)
    config.textual_inversion.vectors, config.textual_inversion.init_text = 2, "red toy car"
    with caplog.at_level(logging.INFO):  # the run's warnings reach the log at INFO (callbacks show them)
        method = trainer_method(tiny_checkpoint, config)
    assert "has 3 tokens but the embedding has 2 vector(s)" in caplog.text
    table = method.bundle.text_encoder.get_input_embeddings().weight
    ids = method.bundle.tokenizer("red toy", add_special_tokens=False).input_ids
    torch.testing.assert_close(method.vectors[0].detach(), table[ids], atol=0, rtol=0)

    config.textual_inversion.vectors, config.textual_inversion.init_text = 4, "red toy"
    stretched = trainer_method(tiny_checkpoint, config).vectors[0].detach()
    torch.testing.assert_close(stretched, table[[ids[0], ids[0], ids[1], ids[1]]], atol=0, rtol=0)


def test_templates_fill_name_and_filewords_deterministically():
    class Fixed:
        def batch(self, index: int) -> Batch:
            return Batch(latents=torch.zeros(3, 4, 8, 8), captions=["", "red hair", f"{TRIGGER.upper()} smiling"])

    templated = TemplatedSource(Fixed(), ("a photo of [name], [filewords]", "[name] by [filewords]"), trigger=TRIGGER, seed=1)
    first = templated.batch(7).captions
    assert first == templated.batch(7).captions, "the same index gives the same prompts (resume)"
    assert first[0] in (f"a photo of {TRIGGER}", TRIGGER)  # empty caption: no dangling separator
    assert first[1] in (f"a photo of {TRIGGER}, red hair", f"{TRIGGER} by red hair")
    assert {tuple(templated.batch(i).captions) for i in range(20)} != {tuple(first)}, "templates vary by index"

    captions_only = TemplatedSource(Fixed(), ("[filewords]",), trigger=TRIGGER, seed=1).batch(0).captions
    assert captions_only == [TRIGGER, f"{TRIGGER}, red hair", f"{TRIGGER.upper()} smiling"]


def test_trigger_word_expands_to_its_vectors_in_any_case_and_only_as_a_whole_word(tiny_checkpoint, image_folder, tmp_path):
    method = trainer_method(tiny_checkpoint, make_config(tiny_checkpoint, image_folder, tmp_path))
    expanded = method.expand(f"{TRIGGER.upper()}, {TRIGGER}s and {TRIGGER}")
    assert expanded.count("<sdcustom-ti-0> <sdcustom-ti-1> <sdcustom-ti-2>") == 2 and f"{TRIGGER}s" in expanded
    with torch.no_grad():
        hooked = method.encode_captions(["a plain prompt"]).context
    from lib_sdcustom.sampling import generate

    with_vectors = generate(method.bundle, [TRIGGER], seed=0, steps=1, width=64, height=64, encode=method.encode_captions)[0]
    without = generate(method.bundle, [TRIGGER], seed=0, steps=1, width=64, height=64)[0]
    assert with_vectors.tobytes() != without.tobytes(), "previews must see the learned vectors"
    method.close()
    with torch.no_grad():
        assert torch.equal(hooked, method.bundle.text_encoder(method.bundle.tokenizer(
            ["a plain prompt"], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0])


def test_resume_matches_an_uninterrupted_run(tiny_checkpoint, image_folder, tmp_path):
    whole = make_config(tiny_checkpoint, image_folder, tmp_path / "whole", steps=8)
    train(whole)
    halves = make_config(tiny_checkpoint, image_folder, tmp_path / "halves", steps=8)
    train_until_cancelled(halves, 4)
    assert files_in(tmp_path / "halves" / "out") == []
    train(halves, resume=tmp_path / "halves" / "run")
    torch.testing.assert_close(final_state(tmp_path / "halves" / "run"), final_state(tmp_path / "whole" / "run"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("args,words", [
    (["--name", "sks toy"], "contains a space"),
    (["--name", "sks<toy>:"], "cannot be used in a file name"),
    (["--name", "dog"], "already knows"),
    (["--vectors", "0"], "--vectors is 0"),
    (["--vectors", "76"], "--vectors is 76"),
    (["--template", "no_such_templates.txt"], "neither object, style, captions nor an existing file"),
    (["--data", "EMPTY"], "No images"),
])
def test_bad_input_is_refused_with_a_clear_message_and_no_file(capsys, tiny_checkpoint, image_folder, tmp_path, args, words):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if arg == "EMPTY" else arg for arg in args]
    out = tmp_path / "out"
    code = main(["train", "--method", "textual_inversion", "--base", str(tiny_checkpoint), "--data", str(image_folder),
                 "--name", TRIGGER, "--out", str(out), "--run-dir", str(tmp_path / "run"), "--steps", "2", *COMMON, *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Fix:" in err, err
    assert files_in(out) == []
