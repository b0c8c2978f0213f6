"""DreamBooth end to end on the tiny checkpoint: the single-file checkpoint (keys, frozen bits, three
independent loaders), prior preservation in the loss, class-image reuse, EMA, DreamBooth-LoRA, bad input."""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import train_until_cancelled, write_images
from lib_sdcustom.cli import main
from lib_sdcustom.config import RunConfig
from lib_sdcustom.data.class_images import MANIFEST_NAME, ClassImageRecipe, prepare_class_images
from lib_sdcustom.formats.checkpoint_file import TrainedWeights, estimated_checkpoint_bytes
from lib_sdcustom.methods.dreambooth import DreamBoothBatches
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.training.ema import ExponentialMovingAverage, ema_decay
from lib_sdcustom.training.batches import Batch
from lib_sdcustom.training.objectives import weighted_loss
from lib_sdcustom.run.train import train

INSTANCE, CLASS = "a photo of sks dog, [filewords]", "a photo of a dog"


def make_config(tiny_checkpoint: Path, images: Path, root: Path, *, method: str = "dreambooth", steps: int = 2,
                prior: bool = True) -> RunConfig:
    config = RunConfig(method=method)
    config.model.base = str(tiny_checkpoint)
    config.data.data = str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "db", str(root / "out"), str(root / "run")
    config.dreambooth.instance_prompt, config.prior.class_prompt = INSTANCE, CLASS
    config.prior.prior_preservation = prior
    config.prior.num_class_images, config.prior.class_sample_steps = 2, 2
    config.prior.class_data = str(root / "class")
    config.network.rank, config.network.alpha = 4, 2.0
    config.optimizer.lr = 1e-3
    config.training.steps, config.training.sample_steps, config.training.save_state_every = steps, 2, 0
    config.training.keep_final_state = True  # the tests read the trainer's last weights from it
    return config


def cli_args(tiny_checkpoint: Path, images: Path, root: Path, *extra: str) -> list[str]:
    return ["train", "--method", "dreambooth", "--base", str(tiny_checkpoint), "--data", str(images), "--name", "db",
            "--out", str(root / "out"), "--run-dir", str(root / "run"), "--resolution", "64", "--min-bucket", "64",
            "--max-bucket", "128", "--sample-steps", "1", "--class-sample-steps", "2", "--quiet",
            "--instance-prompt", INSTANCE, "--keep-final-state", *extra]


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def trainer_bundle(tiny_checkpoint: Path, run_dir: Path):
    """The trainer's own model at the end of the run: the base with the saved trainable weights."""
    state = load_file(str(sorted((run_dir / "state").glob("step-*"))[-1] / "trainable.safetensors"))
    bundle = load_bundle(tiny_checkpoint)
    for prefix, module in (("unet.", bundle.unet), ("text_encoder.", bundle.text_encoder)):
        if not any(key.startswith(prefix) for key in state):
            continue  # a frozen text encoder is not part of the state
        with torch.no_grad():
            for key, param in module.named_parameters():
                param.copy_(state[prefix + key])
    return bundle, state


@torch.no_grad()
def outputs(bundle, unet=None):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    ids = bundle.tokenizer(["a photo of sks dog", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = bundle.text_encoder(ids)[0]
    return hidden, (unet or bundle.unet)(latents, torch.tensor([20, 800]), hidden).sample


@pytest.fixture(scope="module")
def cli_run(tiny_checkpoint, tmp_path_factory):
    """One CLI run: prior preservation, the text encoder trained all along, fp32, an intermediate checkpoint."""
    root = tmp_path_factory.mktemp("db_cli")
    images = write_images(root / "images")
    code = main(cli_args(tiny_checkpoint, images, root, "--class-prompt", CLASS, "--prior-preservation", "--prior-weight", "1.0",
                         "--num-class-images", "2", "--class-data", str(root / "class"), "--train-text-encoder", "1",
                         "--save-precision", "fp32", "--steps", "3", "--save-every", "2", "--lr", "1e-3",
                         "--save-state-every", "3"))
    assert code == 0
    return root


def test_checkpoint_has_the_base_keys_and_shapes_and_keeps_frozen_bits(cli_run, tiny_checkpoint):
    target = cli_run / "out" / "db.safetensors"
    base, _ = read_all(tiny_checkpoint)
    written, metadata = read_all(target)
    assert written.keys() == base.keys()
    assert all(written[key].shape == base[key].shape for key in base)
    frozen = [key for key in base if key.startswith("first_stage_model.") or not key.startswith(("model.", "cond_stage_model."))
              or key.endswith("position_ids")]
    assert "alphas_cumprod" in frozen and any(key.endswith("position_ids") for key in frozen)
    for key in frozen:
        assert written[key].dtype == base[key].dtype and torch.equal(written[key], base[key]), key
    for prefix in ("model.diffusion_model.", "cond_stage_model.transformer.text_model.encoder."):
        assert any(not torch.equal(written[k], base[k]) for k in base if k.startswith(prefix)), f"{prefix} must be trained"
    assert metadata["sdcustom_method"] == "dreambooth" and metadata["sdcustom_steps"] == "3"
    assert metadata["sdcustom_instance_prompt"] == INSTANCE and metadata["sdcustom_class_prompt"] == CLASS
    assert metadata["sdcustom_base_sha256"] == load_bundle(tiny_checkpoint).identity.sha256
    assert (cli_run / "out" / "db.yaml").is_file(), "a base with its own YAML gets one beside the result"
    copied = yaml.safe_load((cli_run / "out" / "db.yaml").read_text())["model"]["params"]["cond_stage_config"]["params"]
    assert Path(copied["version"]).is_absolute() and Path(copied["version"]).is_dir(), \
        "the WebUI resolves a relative text-encoder folder against its own working directory"
    intermediate = cli_run / "out" / "db-steps" / "db-step00000002.safetensors"
    assert read_all(intermediate)[0].keys() == base.keys()
    bundle, _ = trainer_bundle(tiny_checkpoint, cli_run / "run")
    trained = TrainedWeights(unet=bundle.unet.state_dict(), text_encoder=bundle.text_encoder.state_dict())
    assert estimated_checkpoint_bytes(bundle, trained, torch.float32) >= target.stat().st_size


def test_checkpoint_loads_in_our_loader_and_diffusers_with_the_trainers_outputs(cli_run, tiny_checkpoint):
    target = cli_run / "out" / "db.safetensors"
    trainer, _ = trainer_bundle(tiny_checkpoint, cli_run / "run")
    expected = outputs(trainer)
    assert not torch.allclose(expected[1], outputs(load_bundle(tiny_checkpoint))[1])
    ours = outputs(load_bundle(target))
    torch.testing.assert_close(ours[0], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1], expected[1], atol=1e-4, rtol=0)

    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers.UNet2DConditionModel, "from_single_file"):
        pytest.skip("this diffusers has no from_single_file for models")
    yaml_path = str(tiny_checkpoint.with_suffix(".yaml"))
    unet = diffusers.UNet2DConditionModel.from_single_file(str(target), original_config=yaml_path, local_files_only=True)
    vae = diffusers.AutoencoderKL.from_single_file(str(target), original_config=yaml_path, local_files_only=True)
    _, noise = outputs(trainer, unet=unet)
    torch.testing.assert_close(noise, expected[1], atol=1e-4, rtol=0)
    base_vae = load_bundle(tiny_checkpoint).vae.state_dict()
    assert all(torch.equal(value, base_vae[key]) for key, value in vae.state_dict().items())


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state and refuses another mixed precision within a process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_mixed_precision_saves_trained_weights_in_fp16_and_frozen_ones_as_stored(tiny_checkpoint, image_folder, tmp_path,
                                                                                  fresh_accelerate_state):
    config = make_config(tiny_checkpoint, image_folder, tmp_path, prior=False)
    config.training.mixed_precision = "bf16"  # frozen modules sit in bf16 in memory; the file must not
    result = train(config)
    base, _ = read_all(tiny_checkpoint)
    written, metadata = read_all(result.outputs[0])
    assert metadata["sdcustom_prior_preservation"] == "false" and "sdcustom_class_prompt" not in metadata
    for key, value in written.items():  # the UNet and, by default, the text encoder learn; the VAE is frozen
        if key.startswith(("model.diffusion_model.", "cond_stage_model.")) and base[key].is_floating_point():
            assert value.dtype == torch.float16, key
        else:
            assert value.dtype == base[key].dtype and torch.equal(value, base[key]), key
    assert not (tmp_path / "class").exists(), "no class images without prior preservation"


class StubPrior:
    weight = 0.0

    def latents(self, index: int, count: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full((count, *like.shape[1:]), float(index))

    def captions(self, index: int, count: int) -> list[str]:
        return [CLASS] * count


class StubSource:
    def batch(self, index: int) -> Batch:
        return Batch(latents=torch.zeros((3, 4, 8, 8)), captions=["red collar", "", "on grass"])


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 3.0])
def test_prior_weights_make_the_loss_instance_mean_plus_weighted_class_mean(weight):
    prior = StubPrior()
    prior.weight = weight
    batch = DreamBoothBatches(StubSource(), instance_prompt=INSTANCE, name="db", prior=prior).batch(5)
    assert batch.captions == ["a photo of sks dog, red collar", "a photo of sks dog", "a photo of sks dog, on grass"] + [CLASS] * 3
    assert torch.equal(batch.latents[3:], torch.full((3, 4, 8, 8), 5.0))
    per_sample = torch.tensor([0.3, 1.7, 0.9, 2.5, 0.4, 1.1], dtype=torch.float64)
    expected = per_sample[:3].mean() + weight * per_sample[3:].mean()
    torch.testing.assert_close(weighted_loss(per_sample, batch.weights.double()), expected, atol=1e-12, rtol=0)


def test_prior_weight_enters_the_trainers_loss_and_class_images_are_reused(tiny_checkpoint, image_folder, tmp_path):
    """Same seed, same first batch: the first-step loss is A + weight * B with B the class term, B != 0."""
    losses = {}
    for weight in (0.0, 1.0, 2.0):
        config = make_config(tiny_checkpoint, image_folder, tmp_path / f"w{weight}", steps=1)
        config.prior.class_data = str(tmp_path / "class")
        config.prior.prior_weight = weight
        losses[weight] = train(config).losses[0]
        if weight == 0.0:
            first = {path: path.stat().st_mtime_ns for path in files_in(tmp_path / "class")}
    assert len(first) == 3, "2 class images and the manifest"
    assert {path: path.stat().st_mtime_ns for path in files_in(tmp_path / "class")} == first, "later runs generate nothing"
    class_term = losses[1.0] - losses[0.0]
    assert abs(class_term) > 1e-3
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * class_term, abs=1e-5)


def test_class_images_are_reused_and_only_the_shortfall_is_generated(tiny_checkpoint, tmp_path):
    bundle = load_bundle(tiny_checkpoint)
    recipe = ClassImageRecipe(prompt=CLASS, base=bundle.identity.sha256, width=64, height=64, steps=2, guidance=5.0)
    folder = tmp_path / "class"
    first = prepare_class_images(folder, recipe, 2, bundle=bundle, seed=7)
    assert first.generated == 2 and len(first.records) == 2 and not first.user_supplied
    stamps = {path: path.stat().st_mtime_ns for path in files_in(folder)}
    again = prepare_class_images(folder, recipe, 2, bundle=bundle, seed=7)
    assert again.generated == 0 and [r.path for r in again.records] == [r.path for r in first.records]
    assert {path: path.stat().st_mtime_ns for path in files_in(folder)} == stamps
    more = prepare_class_images(folder, recipe, 3, bundle=bundle, seed=7)
    assert more.generated == 1 and [r.path for r in more.records][:2] == [r.path for r in first.records]
    other = prepare_class_images(folder, ClassImageRecipe(**{**recipe.__dict__, "prompt": "a cat"}), 1, bundle=bundle, seed=7)
    assert other.generated == 1 and other.records[0].path not in {r.path for r in more.records}
    manifest = json.loads((folder / MANIFEST_NAME).read_text())["images"]
    assert sorted((e["prompt"], e["seed"]) for e in manifest) == [("a cat", 7), (CLASS, 7), (CLASS, 8), (CLASS, 9)]
    assert all(e["base"] == bundle.identity.sha256 and (e["width"], e["steps"], e["guidance"]) == (64, 2, 5.0) for e in manifest)


def test_ema_update_rule():
    assert ema_decay(0, 0.9999) == pytest.approx(0.1) and ema_decay(10**6, 0.9999) == 0.9999
    param = torch.nn.Parameter(torch.tensor([0.0]))
    ema = ExponentialMovingAverage([("p", param)], decay=0.5)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0], start=1):
        param.data.fill_(value)
        ema.update(step)
        decay = min(0.5, step / (9 + step))
        expected = decay * expected + (1 - decay) * value
    assert ema.state_dict()["p"].item() == pytest.approx(expected)


def test_ema_weights_are_exported_and_resume_exactly(tiny_checkpoint, image_folder, tmp_path):
    def ema_config(name: str) -> RunConfig:
        config = make_config(tiny_checkpoint, image_folder, tmp_path / name, steps=4, prior=False)
        config.dreambooth.ema, config.dreambooth.ema_decay = True, 0.5
        config.output.save_precision, config.training.save_state_every = "fp32", 2
        return config

    whole = ema_config("whole")
    written = read_all(train(whole).outputs[0])[0]
    _, state = trainer_bundle(tiny_checkpoint, Path(whole.output.run_dir))
    assert any(not torch.equal(state["ema." + k], state["unet." + k]) for k in load_bundle(tiny_checkpoint).unet.state_dict())
    exported = load_bundle(Path(whole.output.out) / "db.safetensors").unet.state_dict()
    assert all(torch.equal(exported[key], state["ema." + key]) for key in exported), "the EMA weights are exported"

    halves = ema_config("halves")
    train_until_cancelled(halves, 2)
    resumed = train(halves, resume=Path(halves.output.run_dir))
    for key, value in read_all(resumed.outputs[0])[0].items():
        torch.testing.assert_close(value, written[key], atol=1e-6, rtol=0)


def test_dreambooth_lora_trains_a_network_on_prior_batches(tiny_checkpoint, image_folder, tmp_path):
    config = make_config(tiny_checkpoint, image_folder, tmp_path, method="dreambooth_lora")
    result = train(config)
    target = result.outputs[0]
    with safe_open(str(target), "pt") as handle:
        metadata = handle.metadata()
        assert all(key.startswith(("lora_unet_", "lora_te_")) for key in handle.keys())
    assert metadata["ss_network_module"] == "networks.lora"
    assert json.loads(target.with_suffix(".json").read_text())["activation text"] == "a photo of sks dog"
    assert len(files_in(tmp_path / "class")) == 3


def test_missing_class_prompt_is_refused_before_anything_is_written(capsys, tiny_checkpoint, image_folder, tmp_path):
    code = main(cli_args(tiny_checkpoint, image_folder, tmp_path, "--steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "no class prompt" in err and "--no-prior-preservation" in err
    assert files_in(tmp_path / "out") == [] and not (tmp_path / "run").exists()


def test_not_enough_disk_for_the_checkpoint_stops_before_training(capsys, tiny_checkpoint, image_folder, tmp_path, monkeypatch):
    import lib_sdcustom.files as files

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    code = main(cli_args(tiny_checkpoint, image_folder, tmp_path, "--class-prompt", CLASS, "--class-data",
                         str(tmp_path / "class"), "--steps", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "Not enough disk space for the dreambooth result" in err and "MiB free" in err
    assert files_in(tmp_path / "out") == [] and not (tmp_path / "class").exists()


def test_unreadable_class_image_is_named(capsys, tiny_checkpoint, image_folder, tmp_path):
    folder = tmp_path / "my_dogs"
    folder.mkdir()
    Image.new("RGB", (64, 64), "brown").save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not a picture")
    code = main(cli_args(tiny_checkpoint, image_folder, tmp_path, "--class-prompt", CLASS, "--class-data", str(folder),
                         "--steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "Fix:" in err
    assert files_in(tmp_path / "out") == []
    assert sorted(os.listdir(folder)) == ["broken.png", "good.png"], "a user's class folder is never written to"
