"""kohya ss_* / modelspec metadata: string types, JSON shapes and the values the host keys on."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from lib_sdcustom.formats.network_metadata import (
    BucketStat,
    DatasetDir,
    NetworkTrainingFacts,
    build_network_metadata,
    tag_frequency,
)
from lib_sdcustom.models.bundle import BaseIdentity, ModelFamily

JSON_KEYS = ("ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_bucket_info", "ss_network_args")


def facts(**overrides) -> NetworkTrainingFacts:
    base = BaseIdentity(name="v1-5", path=Path("/models/v1-5-pruned.safetensors"), sha256="ab" * 32, legacy_hash="1234abcd")
    values = dict(
        output_name="my_style", family=ModelFamily.SD1, base=base, network_dim=8, network_alpha=4.0,
        conv_dim=4, conv_alpha=1.0, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5,
        optimizer="AdamW", lr_scheduler="cosine", steps=100, max_train_steps=100, epoch=2, num_epochs=2,
        batch_size=2, gradient_accumulation_steps=2, resolution=(512, 768), num_train_images=20,
        dataset_dirs={"10_sks dog": DatasetDir(n_repeats=10, img_count=2)},
        tag_frequency={"10_sks dog": {"sks": 2, "dog": 2}}, enable_bucket=True,
        buckets=[BucketStat((512, 768), 2), BucketStat((768, 512), 1)], mean_img_ar_error=0.01,
        clip_skip=2, seed=42, noise_offset=0.05, min_snr_gamma=5.0, mixed_precision="fp16",
        training_started_at=1_700_000_000.0, training_finished_at=1_700_000_600.0, session_id=7,
        comment="test run", trigger_phrase="sks dog",
    )
    values.update(overrides)
    return NetworkTrainingFacts(**values)


def test_every_value_is_a_string_and_structured_values_are_json() -> None:
    meta = build_network_metadata(facts())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for key in JSON_KEYS:
        json.loads(meta[key])
    # The host JSON-decodes every value that starts with '{': each must then be a valid object.
    for key, value in meta.items():
        if value.startswith("{"):
            assert isinstance(json.loads(value), dict), key


def test_json_shapes_are_the_ones_the_host_card_reads() -> None:
    meta = build_network_metadata(facts())
    assert json.loads(meta["ss_tag_frequency"]) == {"10_sks dog": {"sks": 2, "dog": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}
    buckets = json.loads(meta["ss_bucket_info"])
    assert buckets["buckets"] == {"0": {"resolution": [512, 768], "count": 2}, "1": {"resolution": [768, 512], "count": 1}}
    assert buckets["mean_img_ar_error"] == 0.01


def test_identity_and_hyperparameters() -> None:
    meta = build_network_metadata(facts())
    assert meta["ss_output_name"] == "my_style"
    assert meta["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert meta["ss_sd_model_hash"] == "1234abcd"
    assert meta["ss_new_sd_model_hash"] == "ab" * 32
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_resolution"] == "(512, 768)"
    assert meta["ss_total_batch_size"] == "4"
    assert meta["ss_clip_skip"] == "2" and meta["ss_seed"] == "42"
    assert meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_gradient_checkpointing"] == "False"
    assert meta["ss_training_started_at"] == "1700000000.0"
    assert meta["ss_session_id"] == "7"
    assert meta["ss_steps"] == "100" and meta["ss_epoch"] == "2"


@pytest.mark.parametrize("family, v_pred, version, v2, arch, impl", [
    (ModelFamily.SD1, False, "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers"),
    (ModelFamily.SD1, True, "sd_v1_v", "False", "stable-diffusion-v1/lora", "diffusers"),
    (ModelFamily.SD2, False, "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers"),
    (ModelFamily.SD2, True, "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers"),
    (ModelFamily.SDXL, False, "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models"),
])
def test_family_keys(family, v_pred, version, v2, arch, impl) -> None:
    meta = build_network_metadata(facts(family=family, v_prediction=v_pred))
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.implementation"] == impl
    assert meta["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")


def test_network_module_and_args() -> None:
    kohya = build_network_metadata(facts(algo="lora", conv_dim=4, conv_alpha=1.0))
    assert kohya["ss_network_module"] == "networks.lora"
    assert json.loads(kohya["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}
    loha = build_network_metadata(facts(algo="loha", conv_dim=None, network_args={"use_tucker": True}))
    assert loha["ss_network_module"] == "lycoris.kohya"
    assert json.loads(loha["ss_network_args"]) == {"algo": "loha", "use_tucker": "True"}
    plain = build_network_metadata(facts(conv_dim=None))
    assert "ss_network_args" not in plain


def test_modelspec() -> None:
    meta = build_network_metadata(facts())
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "my_style"
    assert meta["modelspec.resolution"] == "512x768"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.trigger_phrase"] == "sks dog"
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]) == datetime.datetime.fromtimestamp(1_700_000_600)


def test_unknown_facts_are_left_out_not_written_as_none() -> None:
    meta = build_network_metadata(facts(seed=None, clip_skip=None, noise_offset=None, buckets=[],
                                        base=BaseIdentity(name="local"), comment=""))
    assert "None" not in meta.values()
    for key in ("ss_seed", "ss_clip_skip", "ss_noise_offset", "ss_bucket_info", "ss_sd_model_hash",
                "ss_new_sd_model_hash", "ss_training_comment", "modelspec.encoder_layer"):
        assert key not in meta
    assert meta["ss_sd_model_name"] == "local"


def test_tag_frequency_counts_like_kohya() -> None:
    counts = tag_frequency({"5_a": ["sks, Dog , red", "sks,dog,,  ", "SKS"], "1_b": []})
    assert counts == {"5_a": {"sks": 3, "dog": 2, "red": 1}, "1_b": {}}
