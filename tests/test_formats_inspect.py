"""`inspect_file` on synthetic networks, embeddings and checkpoints, and its refusals."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_sdcustom.errors import ModelLoadError
from lib_sdcustom.formats.inspect import inspect_file
from lib_sdcustom.formats.network_file import write_network_file
from lib_sdcustom.formats.network_metadata import NetworkTrainingFacts, build_network_metadata
from lib_sdcustom.models.bundle import BaseIdentity, ModelFamily

ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
ATTN1_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def lora(name: str, down_shape: tuple, up_shape: tuple, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.randn(down_shape), f"{name}.lora_up.weight": torch.randn(up_shape),
            f"{name}.alpha": torch.tensor(alpha)}


def write(tmp_path: Path, name: str, tensors: dict, family: ModelFamily = ModelFamily.SD1, algo: str = "lora") -> Path:
    facts = NetworkTrainingFacts(output_name=name, family=family, base=BaseIdentity(name="base"), network_dim=4,
                                 network_alpha=1.0, algo=algo, training_finished_at=1.7e9)
    return write_network_file(tmp_path / f"{name}.safetensors", tensors, build_network_metadata(facts),
                              dtype=torch.float16)


def test_kohya_lora_sd1(tmp_path: Path) -> None:
    tensors = {**lora(ATTN2_K, (4, 768), (32, 4)), **lora(ATTN1_Q, (4, 32), (32, 4)), **lora(TE_Q, (4, 768), (768, 4), 2.0)}
    report = inspect_file(write(tmp_path, "net", tensors))
    assert "Kind: LoRA/LyCORIS network" in report
    assert "Prompt: <lora:net:1>" in report
    assert "Format: LoRA (kohya)" in report
    assert "Modules: UNet 2, text encoder 1" in report
    assert "Rank: 4 (3 modules)" in report
    assert "1.0 (2 modules)" in report and "2.0 (1 modules)" in report
    assert "Family from keys: SD1; from metadata: SD1; host lists the card for: SD1" in report
    assert "Dtype: F16 (9 tensors)" in report
    assert "ss_network_module: networks.lora" in report
    assert ": matches" in report
    assert "Warning" not in report


def test_locon_and_cp(tmp_path: Path) -> None:
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {**lora(ATTN2_K, (4, 768), (32, 4)), **lora(conv, (4, 32, 3, 3), (32, 4, 1, 1))}
    assert "Format: LoCon (LoRA on linear and 3x3 conv layers)" in inspect_file(write(tmp_path, "locon", tensors))
    cp = {**lora(conv, (4, 32, 1, 1), (32, 4, 1, 1)), f"{conv}.lora_mid.weight": torch.randn(4, 4, 3, 3)}
    assert "with CP/Tucker mid weights" in inspect_file(write(tmp_path, "cp", cp))


def test_loha(tmp_path: Path) -> None:
    tensors = {f"{ATTN2_K}.hada_w1_a": torch.randn(32, 8), f"{ATTN2_K}.hada_w1_b": torch.randn(8, 768),
               f"{ATTN2_K}.hada_w2_a": torch.randn(32, 8), f"{ATTN2_K}.hada_w2_b": torch.randn(8, 768),
               f"{ATTN2_K}.alpha": torch.tensor(4.0)}
    report = inspect_file(write(tmp_path, "loha", tensors, algo="loha"))
    assert "Format: LoHa" in report and "Rank: 8 (1 modules)" in report and "Alpha: 4.0" in report
    assert "Family from keys: SD1" in report and "lycoris.kohya" in report


def test_lokr_sdxl(tmp_path: Path) -> None:
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{name}.lokr_w1": torch.randn(4, 4), f"{name}.lokr_w2_a": torch.randn(8, 2),
               f"{name}.lokr_w2_b": torch.randn(2, 16), f"{name}.alpha": torch.tensor(1.0),
               **lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", (4, 8), (8, 4))}
    report = inspect_file(write(tmp_path, "lokr", tensors, family=ModelFamily.SDXL, algo="lokr"))
    assert "LoKr" in report and "2 (1 modules)" in report
    assert "Modules: UNet 1, text encoder 1 (CLIP-L) 1" in report
    assert "Family from keys: SDXL; from metadata: SDXL; host lists the card for: SDXL" in report


def test_warnings_for_files_other_tools_wrote(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    tensors = {**lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", (4, 8), (8, 4)),
               "lora_unet_x.lokr_t1": torch.ones(2, 2, 1, 1), "lora_unet_x.lokr_w1_a": torch.ones(2, 2),
               "lora_unet_x.lokr_w1_b": torch.ones(2, 2), "lora_unet_x.lokr_w2": torch.ones(2, 2),
               "lora_unet_y.lora_A.weight": torch.ones(2, 2)}
    save_file(tensors, str(path), metadata={"ss_output_name": "alias", "sshs_model_hash": "0" * 64})
    report = inspect_file(path)
    assert "Prompt: <lora:alias:1>  (file stem 'other' works too)" in report
    assert "DOES NOT MATCH" in report
    assert "Warning: Keys say SDXL but the host will list the card for SD1" in report
    assert "1 modules carry weight parts the host ignores, e.g. lora_unet_x" in report
    assert "lokr_t1: the host cannot apply this LoKr correctly" in report
    assert "1 modules match none of the host's module types, e.g. lora_unet_y" in report


def test_embeddings(tmp_path: Path) -> None:
    sd1 = tmp_path / "sks.safetensors"
    save_file({"emb_params": torch.randn(3, 768)}, str(sd1))
    report = inspect_file(sd1)
    assert "Textual Inversion embedding" in report and "Trigger word: sks" in report
    assert "Vectors: 3" in report and "Width: 768 -> SD1" in report and "single tensor 'emb_params'" in report

    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(sdxl))
    report = inspect_file(sdxl)
    assert "SDXL pair" in report and "Vectors: 2" in report and "Width: 2048 -> SDXL" in report

    pt = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(5, 1024)}, "name": "other",
                "step": 500, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "v2"}, pt)
    report = inspect_file(pt)
    assert "A1111 dict (string_to_param)" in report and "Vectors: 5" in report and "Width: 1024 -> SD2" in report
    assert "step: 500" in report and "sd_checkpoint: abcdef1234" in report
    assert "Warning: stored name 'other' differs" in report


def test_checkpoints(tmp_path: Path) -> None:
    sd2 = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)},
              str(sd2), metadata={"format": "pt"})
    report = inspect_file(sd2)
    assert "Stable Diffusion checkpoint" in report and "Family: SD2" in report
    assert "UNet 2 tensors" in report and "text encoder 1 tensors" in report and "VAE 1 tensors" in report
    assert "UNet input channels: 9  (inpainting)" in report and "Metadata: 1 keys: format" in report
    assert "Warning" not in report

    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)},
                "global_step": 5}, ckpt)
    report = inspect_file(ckpt)
    assert "Family: SD1" in report and "global_step: 5" in report and "Warning: no VAE" in report


class Payload:  # a pickled class: not loadable with weights_only
    pass


def make_bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"text": tmp_path / "notes.txt", "garbage": tmp_path / "garbage.safetensors",
             "layout": tmp_path / "layout.safetensors", "pickle": tmp_path / "evil.pt",
             "empty": tmp_path / "empty.safetensors", "missing": tmp_path / "missing.safetensors"}
    files["text"].write_text("hello")
    files["garbage"].write_bytes(b"\xff" * 64)
    save_file({"a": torch.zeros(2, 2, 2), "b": torch.zeros(2)}, str(files["layout"]))
    torch.save(collections.OrderedDict(x=Payload()), files["pickle"])
    save_file({}, str(files["empty"]))
    return files


@pytest.mark.parametrize("case", ["text", "garbage", "layout", "pickle", "empty", "missing"])
def test_unknown_files_raise_a_user_facing_error(tmp_path: Path, case: str) -> None:
    path = make_bad_files(tmp_path)[case]
    with pytest.raises(ModelLoadError) as error:
        inspect_file(path)
    assert path.name in str(error.value) and error.value.fix
