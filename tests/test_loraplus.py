"""LoRA+ (`--loraplus-lr-ratio`): each layer's up matrix learns at the ratio times its model's rate, its down matrix
at the rate itself, and the schedule treats both groups of a model as one."""

from __future__ import annotations

import json

import pytest
import torch

from lib_sdcustom.config import NetworkOptions
from lib_sdcustom.formats.network_file import read_network_file
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.networks.algorithms import ALGORITHMS
from lib_sdcustom.networks.lycoris_backend import attach_network
from lib_sdcustom.run.train import train
from lib_sdcustom.training.schedules import build_scheduler
from test_train_network import make_config


def test_the_up_matrices_get_a_group_of_their_own_at_the_ratio_times_the_rate(tiny_checkpoint):
    bundle = load_bundle(tiny_checkpoint)
    attached = attach_network(bundle.unet, bundle.text_encoder, ALGORITHMS["locon"], NetworkOptions(rank=4),
                              train_text_encoder=True)
    try:
        groups = attached.param_groups(unet_lr=1e-3, text_encoder_lr=2e-3, up_lr_ratio=16)
        plain = attached.param_groups(unet_lr=1e-3, text_encoder_lr=2e-3)
        up_ids = {id(p) for module in attached.unet_modules + attached.text_encoder_modules
                  for name, p in module.named_parameters() if name.startswith("lora_up.")}
    finally:
        attached.detach()

    assert [(g["name"], g["lr"]) for g in groups] == [("text_encoder", 3.2e-2), ("text_encoder", 2e-3),
                                                      ("unet", 1.6e-2), ("unet", 1e-3)]
    assert [(g["name"], g["lr"]) for g in plain] == [("text_encoder", 2e-3), ("unet", 1e-3)]
    assert all(id(p) in up_ids for p in groups[0]["params"] + groups[2]["params"])
    assert not any(id(p) in up_ids for p in groups[1]["params"] + groups[3]["params"])
    split = [id(p) for g in groups for p in g["params"]]
    assert len(split) == len(set(split)) and set(split) == {id(p) for g in plain for p in g["params"]}

    # A text encoder that stops training stops both of its groups.
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    scheduler = build_scheduler(optimizer, "constant", 10, stop_groups_at={"text_encoder": 1})
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0, 1.6e-2, 1e-3]


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_a_run_moves_the_up_matrices_at_the_ratio_and_the_file_says_so(tiny_checkpoint, image_folder, tmp_path, ratio):
    config = make_config(tiny_checkpoint, image_folder, tmp_path / "out", steps=1)
    config.optimizer.scheduler, config.optimizer.text_encoder_lr = "constant", 2 * config.optimizer.lr
    config.training.train_text_encoder = 1.0
    config.network.loraplus_lr_ratio = ratio
    tensors, metadata = read_network_file(train(config).outputs[0])

    # The up matrices start at zero and AdamW's first step moves each weight by its rate (sign of the gradient).
    for prefix, rate in (("lora_unet_", config.unet_lr), ("lora_te_", config.text_encoder_lr)):
        moved = max(float(value.abs().max()) for key, value in tensors.items()
                    if key.startswith(prefix) and key.endswith("lora_up.weight"))
        assert moved == pytest.approx(rate * ratio, rel=1e-3), prefix
    args = json.loads(metadata.get("ss_network_args") or "{}")
    assert args.get("loraplus_lr_ratio") == (None if ratio == 1 else "16.0")
