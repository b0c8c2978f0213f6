"""Every optimizer the config offers builds and steps; a missing optional package is a clear message."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lib_sdcustom.config import OPTIMIZERS, RunConfig, config_from_dict
from lib_sdcustom.errors import ConfigError
from lib_sdcustom.training.optimizers import build_optimizer
from lib_sdcustom.training.schedules import build_scheduler

OPTIONAL_PACKAGE = {"adamw8bit": "bitsandbytes", "lion": "lion_pytorch", "prodigy": "prodigyopt"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps_or_explains_what_is_missing(name: str) -> None:
    weight = torch.nn.Parameter(torch.ones(4, 4))
    package = OPTIONAL_PACKAGE.get(name)
    if package and importlib.util.find_spec(package) is None:
        with pytest.raises(ConfigError, match=f"pip install"):
            build_optimizer(name, [{"params": [weight], "lr": 0.1}], lr=0.1, weight_decay=0.0)
        return
    if name == "adamw8bit":
        pytest.skip("bitsandbytes is installed; its 8-bit optimizer needs a GPU")
    optimizer = build_optimizer(name, [{"params": [weight], "lr": 0.1}], lr=0.1, weight_decay=0.0)
    (weight ** 2).sum().backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), torch.ones(4, 4))


def test_a_group_can_stop_learning_part_way() -> None:
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [a], "name": "text_encoder"}, {"params": [b], "name": "unet"}], lr=1.0)
    scheduler = build_scheduler(optimizer, "constant", 10, stop_groups_at={"text_encoder": 3})
    rates = []
    for _ in range(5):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates == [[1.0, 1.0]] * 3 + [[0.0, 1.0]] * 2


def test_a_group_can_join_late_and_leave_early() -> None:
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [a], "name": "text_encoder"}, {"params": [b], "name": "embedding"}], lr=1.0)
    scheduler = build_scheduler(optimizer, "constant", 10, stop_groups_at={"text_encoder": 4},
                                start_groups_at={"text_encoder": 2})
    rates = []
    for _ in range(5):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates == [[0.0, 1.0]] * 2 + [[1.0, 1.0]] * 2 + [[0.0, 1.0]]


def test_adamw_uses_the_fused_kernel_where_torch_has_one() -> None:
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = build_optimizer("adamw", [{"params": [weight], "lr": 0.1}], lr=0.1, weight_decay=0.0)
    has_cpu_kernel = torch.torch_version.TorchVersion(torch.__version__) >= "2.4"
    assert bool(optimizer.defaults["fused"]) == has_cpu_kernel


def test_auto_schedule_decays_the_networks_and_keeps_the_other_methods_constant() -> None:
    """The quality benchmark's recipes: networks, DreamBooth-LoRA and pivotal tuning with a cosine decay, the rest
    measured at a constant rate."""
    decaying = ("lora", "locon", "lokr", "dreambooth_lora", "pivotal")
    assert [RunConfig(method=method).scheduler for method in decaying] == ["cosine"] * len(decaying)
    for method in ("dreambooth", "textual_inversion", "hypernetwork"):
        assert RunConfig(method=method).scheduler == "constant"
    chosen = config_from_dict({"method": "lora", "optimizer": {"scheduler": "constant"}})
    assert chosen.scheduler == "constant"  # a user's or a preset's choice stands
