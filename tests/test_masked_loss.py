"""Masked loss: a picture's mask (its alpha channel or a same-stem NAME.mask.png) follows the picture's crop and
flip, is averaged down to the latent grid, and weights the loss; pictures without a mask train exactly as
without masked loss."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import write_images
from lib_sdcustom.config import RunConfig
from lib_sdcustom.data.buckets import image_to_tensor
from lib_sdcustom.data.dataset import BatchingOptions, TrainingSet
from lib_sdcustom.data.masks import mask_to_tensor
from lib_sdcustom.data.scan import scan_dataset
from lib_sdcustom.run.train import train
from lib_sdcustom.training.objectives import per_sample_mse


def subject_picture(width: int = 96, height: int = 64) -> Image.Image:
    """White with a red rectangle off-centre; opaque only on the rectangle."""
    picture = Image.new("RGBA", (width, height), (255, 255, 255, 0))
    picture.paste((255, 0, 0, 255), (8, 16, 40, 56))
    return picture


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("crop_seed", [None, 7])
def test_the_mask_takes_the_pictures_crop_and_flip(flip, crop_seed):
    picture = subject_picture()
    bucket = (64, 64)
    pixels = image_to_tensor(picture.convert("RGB"), bucket, flip=flip,
                             crop_rng=None if crop_seed is None else random.Random(crop_seed))
    mask = mask_to_tensor(picture.getchannel("A"), bucket, flip=flip,
                          crop_rng=None if crop_seed is None else random.Random(crop_seed), latent_scale=1)[0]
    red = (pixels[0] > 0.5) & (pixels[1] < -0.5)  # red where the subject is, white elsewhere
    assert mask.shape == red.shape == (64, 64)
    agreement = ((mask > 0.5) == red).float().mean()
    assert red.any() and agreement > 0.98, float(agreement)


def test_the_latent_mask_is_the_share_of_each_cell_masked_in():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 12, 64))  # the first cell column whole, half of the second
    latent = mask_to_tensor(mask, (64, 64), flip=False, crop_rng=None, latent_scale=8)
    assert latent.shape == (1, 8, 8)
    torch.testing.assert_close(latent[0, :, 0], torch.ones(8))
    torch.testing.assert_close(latent[0, :, 1], torch.full((8,), 0.5))
    assert float(latent[0, :, 2:].abs().max()) == 0


def test_the_loss_counts_only_the_masked_part():
    target = torch.zeros(2, 4, 8, 8)
    prediction = torch.zeros(2, 4, 8, 8)
    prediction[:, :, :, 4:] = 3.0  # wrong only on the right half
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :, :4] = 1.0  # sample 0 learns the left half only
    mask[1, :, :, 2:6] = 0.5  # sample 1: a soft mask over both halves
    loss = per_sample_mse(prediction, target, mask)
    torch.testing.assert_close(loss, torch.tensor([0.0, 4.5]))
    torch.testing.assert_close(per_sample_mse(prediction, target, torch.ones(2, 1, 8, 8)), per_sample_mse(prediction, target))
    assert float(per_sample_mse(prediction, target, torch.zeros(2, 1, 8, 8)).abs().max()) == 0


def test_batches_carry_masks_from_files_and_alpha_and_ones_for_the_rest(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    subject_picture(64, 64).save(folder / "alpha.png")
    Image.new("RGB", (64, 64), (0, 90, 0)).save(folder / "file.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    mask.save(folder / "file.mask.png")
    Image.new("RGB", (64, 64), (0, 0, 90)).save(folder / "plain.png")
    scan = scan_dataset(folder)
    assert sorted(record.path.name for record in scan.records) == ["alpha.png", "file.png", "plain.png"]
    training_set = TrainingSet(scan, BatchingOptions(resolution=64, buckets=False, batch_size=3, masked_loss=True))
    examples = training_set.batches_for_epoch(0)[0]
    masks = training_set.load_batch_masks(examples, latent_scale=8)
    by_name = {training_set.record(example).path.name: masks[index, 0] for index, example in enumerate(examples)}
    torch.testing.assert_close(by_name["plain.png"], torch.ones(8, 8))
    assert float(by_name["file.png"][:, :4].max()) == 0 and float(by_name["file.png"][:, 4:].min()) == 1
    assert 0 < float(by_name["alpha.png"].mean()) < 0.5
    unmasked = TrainingSet(scan, BatchingOptions(resolution=64, buckets=False, batch_size=3))
    assert unmasked.load_batch_masks(unmasked.batches_for_epoch(0)[0], latent_scale=8) is None


def _final_state(tiny_checkpoint: Path, images: Path, root: Path, *, masked_loss: bool) -> dict[str, torch.Tensor]:
    config = RunConfig(method="lora")
    config.model.base, config.data.data = str(tiny_checkpoint), str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.data.masked_loss = masked_loss
    config.output.name, config.output.out, config.output.run_dir = "masked", str(root / "out"), str(root / "run")
    config.training.steps, config.training.sample_steps, config.training.save_state_every = 3, 1, 0
    config.training.keep_final_state = True
    train(config)
    return load_file(str(sorted((root / "run" / "state").glob("step-*"))[-1] / "trainable.safetensors"))


def test_unmasked_pictures_train_bit_for_bit_as_before_and_masks_change_the_result(tiny_checkpoint, tmp_path):
    images = write_images(tmp_path / "images")
    off = _final_state(tiny_checkpoint, images, tmp_path / "off", masked_loss=False)
    on = _final_state(tiny_checkpoint, images, tmp_path / "on", masked_loss=True)
    assert off.keys() == on.keys() and all(torch.equal(off[key], on[key]) for key in off)
    for index, picture in enumerate(sorted(images.glob("*.png"))):
        mask = np.zeros(Image.open(picture).size[::-1], dtype=np.uint8)
        mask[:, : mask.shape[1] // (index + 2)] = 255
        Image.fromarray(mask).save(picture.with_name(picture.stem + ".mask.png"))
    masked = _final_state(tiny_checkpoint, images, tmp_path / "masked", masked_loss=True)
    assert any(not torch.equal(off[key], masked[key]) for key in off), "the masks must change what is learned"
