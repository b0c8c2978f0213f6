"""The network writer: what reaches the disk is exactly what the host loads, hashed as the host expects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_sdcustom.errors import ModelLoadError, OutputError
from lib_sdcustom.formats.network_file import read_network_file, validate_network_state, write_network_file
from lib_sdcustom.hashing import addnet_hash_file

SD1_META = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": "net"}
SDXL_META = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_output_name": "net"}


def lora_module(name: str, in_f: int, out_f: int, rank: int = 4, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": torch.randn(rank, in_f),
        f"{name}.lora_up.weight": torch.randn(out_f, rank),
        f"{name}.alpha": torch.tensor(alpha),
    }


def small_lora() -> dict[str, torch.Tensor]:
    return {
        **lora_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32),
        **lora_module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 16, 16),
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_and_hash_equals_host_addnet_hash(tmp_path: Path) -> None:
    # Big enough (> 1 MiB + 64 KiB) for the legacy window to hold real data.
    tensors = {**small_lora(), **lora_module("lora_unet_mid_block_attentions_0_proj_in", 40_000, 8, rank=8)}
    metadata = {**SD1_META, "modelspec.title": "net"}
    path = write_network_file(tmp_path / "net.safetensors", tensors, metadata, dtype=torch.float32)

    loaded, meta = read_network_file(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)
    assert meta["sshs_model_hash"] == addnet_hash_file(path)
    # kohya's legacy hash: the 64 KiB at 1 MiB of the serialization holding only ss_* metadata.
    ss_only = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert {k: meta[k] for k in metadata} == metadata


def test_hash_ignores_non_ss_metadata(tmp_path: Path) -> None:
    tensors = small_lora()
    a = write_network_file(tmp_path / "a.safetensors", tensors, {**SD1_META, "modelspec.title": "a"}, dtype=torch.float16)
    b = write_network_file(tmp_path / "b.safetensors", tensors, {**SD1_META, "modelspec.title": "bb"}, dtype=torch.float16)
    assert read_network_file(a)[1]["sshs_model_hash"] == read_network_file(b)[1]["sshs_model_hash"] == addnet_hash_file(b)


def test_fp16_save_casts_weights_and_alpha_but_not_integers(tmp_path: Path) -> None:
    tensors = {
        **{k: v.double() for k, v in small_lora().items()},
        "lora_unet_mid_block_attentions_0_proj_out.weight": torch.ones(8),  # IA3
        "lora_unet_mid_block_attentions_0_proj_out.on_input": torch.tensor(1),
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2),  # int alpha is cast too
    }
    path = write_network_file(tmp_path / "n.safetensors", tensors, SD1_META, dtype=torch.float16)
    loaded, _ = read_network_file(path)
    for key, value in loaded.items():
        expected = torch.int64 if key.endswith("on_input") else torch.float16
        assert value.dtype == expected, key
    assert loaded["lora_unet_mid_block_attentions_0_proj_in.alpha"].item() == 2.0


def test_accepts_lycoris_algorithms_and_bundled_embeddings() -> None:
    loha = {f"lora_unet_x_a.{p}": torch.randn(8, 2) for p in ("hada_w1_a", "hada_w2_a")}
    loha.update({f"lora_unet_x_a.{p}": torch.randn(2, 8) for p in ("hada_w1_b", "hada_w2_b")})
    loha["lora_unet_x_a.alpha"] = torch.tensor(1.0)
    lokr = {"lora_unet_x_b.lokr_w1": torch.randn(2, 2), "lora_unet_x_b.lokr_w2_a": torch.randn(4, 2),
            "lora_unet_x_b.lokr_w2_b": torch.randn(2, 4), "lora_unet_x_b.alpha": torch.tensor(1.0)}
    cp = {"lora_unet_x_c.lora_down.weight": torch.randn(2, 8, 1, 1), "lora_unet_x_c.lora_mid.weight": torch.randn(2, 2, 3, 3),
          "lora_unet_x_c.lora_up.weight": torch.randn(8, 2, 1, 1), "lora_unet_x_c.alpha": torch.tensor(1.0)}
    bundle = {"bundle_emb.mytok.string_to_param.*": torch.randn(2, 768)}
    validate_network_state({**loha, **lokr, **cp, **bundle}, SD1_META)
    sdxl_bundle = {"bundle_emb.tok.clip_l": torch.randn(2, 768), "bundle_emb.tok.clip_g": torch.randn(2, 1280)}
    validate_network_state({**lora_module("lora_te1_text_model_encoder_layers_0_mlp_fc1", 8, 8), **sdxl_bundle}, SDXL_META)


MALFORMED = {
    "no prefix": ({**lora_module("unet_down_blocks_0_x", 4, 4)}, SD1_META, "does not start with"),
    "no alpha": ({k: v for k, v in small_lora().items() if not k.endswith("alpha")}, SD1_META, "no 'alpha'"),
    "up without down": ({"lora_unet_x.lora_up.weight": torch.randn(4, 2), "lora_unet_x.alpha": torch.tensor(1.0)},
                        SD1_META, "match none"),
    "unknown extra part": ({**lora_module("lora_unet_x", 4, 4), "lora_unet_x.lora_extra": torch.ones(1)},
                           SD1_META, "match none"),
    "lora and loha mixed": ({**lora_module("lora_unet_x", 4, 4), "lora_unet_x.hada_w1_a": torch.ones(4, 2)},
                            SD1_META, "match none"),
    "lokr_t1": ({"lora_unet_x.lokr_w1_a": torch.ones(2, 2), "lora_unet_x.lokr_w1_b": torch.ones(2, 2),
                 "lora_unet_x.lokr_t1": torch.ones(2, 2, 1, 1), "lora_unet_x.lokr_w2": torch.ones(2, 2),
                 "lora_unet_x.alpha": torch.tensor(1.0)}, SD1_META, "lokr_t1"),
    "rank mismatch": ({"lora_unet_x.lora_down.weight": torch.ones(4, 8), "lora_unet_x.lora_up.weight": torch.ones(8, 2),
                       "lora_unet_x.alpha": torch.tensor(1.0)}, SD1_META, "rank"),
    "alpha not scalar": ({**lora_module("lora_unet_x", 4, 4), "lora_unet_x.alpha": torch.ones(2)}, SD1_META, "scalar"),
    "dora output-oriented": ({**lora_module("lora_unet_x", 8, 6), "lora_unet_x.dora_scale": torch.ones(6, 1)},
                             SD1_META, "dora_scale"),
    "lora_te on sdxl": (lora_module("lora_te_text_model_encoder_layers_0_mlp_fc1", 4, 4), SDXL_META, "lora_te_"),
    "te1 on sd1": (lora_module("lora_te1_text_model_encoder_layers_0_mlp_fc1", 4, 4), SD1_META, "SDXL text-encoder"),
    "sdxl without version": (lora_module("lora_te2_text_model_encoder_layers_0_mlp_fc1", 4, 4),
                             {"ss_output_name": "n"}, "ss_base_model_version"),
    "sdxl diffusers upsampler": (lora_module("lora_unet_up_blocks_0_upsamplers_0_conv", 4, 4), SDXL_META, "upsamplers"),
    "te and te1 mixed": ({**lora_module("lora_te_text_model_encoder_layers_0_mlp_fc1", 4, 4),
                          **lora_module("lora_te1_text_model_encoder_layers_0_mlp_fc1", 4, 4)}, SDXL_META, "mixes"),
    "bundle with two vectors": ({**small_lora(), "bundle_emb.t.a": torch.ones(1, 768), "bundle_emb.t.b": torch.ones(1, 768)},
                                SD1_META, "Bundled embedding"),
    "metadata not str": (small_lora(), {**SD1_META, "ss_network_dim": 4}, "str"),
    "value not tensor": ({**small_lora(), "lora_unet_y.alpha": 1.0}, SD1_META, "not a tensor"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_writer_refuses_malformed_sets_and_writes_nothing(tmp_path: Path, case: str) -> None:
    tensors, metadata, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message):
        write_network_file(tmp_path / "bad.safetensors", tensors, metadata, dtype=torch.float32)
    assert leftovers(tmp_path) == []


def test_tensors_sharing_storage_are_written(tmp_path: Path) -> None:
    shared = torch.randn(8, 4)
    tensors = {"lora_unet_x.lora_down.weight": shared[:4], "lora_unet_x.lora_up.weight": shared[4:],
               "lora_unet_x.alpha": torch.tensor(1.0)}
    loaded, _ = read_network_file(write_network_file(tmp_path / "n.safetensors", tensors, SD1_META, dtype=torch.float32))
    assert torch.equal(loaded["lora_unet_x.lora_up.weight"], shared[4:])


def test_tensor_that_cannot_be_serialized_leaves_nothing(tmp_path: Path) -> None:
    tensors = small_lora()
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.empty(16, 4, device="meta")
    with pytest.raises(NotImplementedError):
        write_network_file(tmp_path / "n.safetensors", tensors, SD1_META, dtype=torch.float16)
    assert leftovers(tmp_path) == []


def test_failure_while_writing_keeps_the_old_file_and_removes_the_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "n.safetensors"
    write_network_file(target, small_lora(), SD1_META, dtype=torch.float16)
    before = target.read_bytes()

    def disk_full(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        write_network_file(target, small_lora(), SD1_META, dtype=torch.float16)
    assert leftovers(tmp_path) == ["n.safetensors"]
    assert target.read_bytes() == before


def test_failure_on_a_new_file_does_not_create_the_target(tmp_path: Path, monkeypatch) -> None:
    def fail(self: Path, data: bytes) -> int:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(Path, "write_bytes", fail)
    with pytest.raises(OutputError):
        write_network_file(tmp_path / "new.safetensors", small_lora(), SD1_META, dtype=torch.float32)
    assert leftovers(tmp_path) == []


def test_reading_a_file_that_is_not_safetensors_names_it(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.safetensors"
    bogus.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        read_network_file(bogus)


def test_diffusers_reads_the_file_as_an_independent_consumer(tmp_path: Path) -> None:
    """diffusers' kohya converter rejects any key it does not consume, so this checks the key set too."""
    loader = pytest.importorskip("diffusers.loaders.lora_pipeline").StableDiffusionLoraLoaderMixin
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {**small_lora(), f"{conv}.lora_down.weight": torch.randn(4, 32, 3, 3),
               f"{conv}.lora_up.weight": torch.randn(32, 4, 1, 1), f"{conv}.alpha": torch.tensor(2.0)}
    path = write_network_file(tmp_path / "n.safetensors", tensors, SD1_META, dtype=torch.float16)
    state_dict, alphas = loader.lora_state_dict(str(path.parent), weight_name=path.name)
    assert len(state_dict) == 6
    assert state_dict["unet.down_blocks.0.resnets.0.conv1.lora.down.weight"].shape == (4, 32, 3, 3)
    assert alphas["unet.down_blocks.0.resnets.0.conv1.alpha"] == 2.0
    assert sorted(alphas.values()) == [1.0, 1.0, 2.0]
