"""The method table: each spec agrees with its class, the option sections and the network algorithms, and the
places that used to test method names (config defaults, hosts, tab) give what the table says."""

from __future__ import annotations

import pytest

from lib_sdcustom import config as config_module
from lib_sdcustom.config import SECTIONS, RunConfig
from lib_sdcustom.host.base import StandaloneHost, output_kind, prompt_snippet, trained_in_place
from lib_sdcustom.methods.base import Method
from lib_sdcustom.methods.registry import COMPONENTS, METHOD_SECTIONS, METHOD_SPECS, METHODS, OutputKind
from lib_sdcustom.networks.algorithms import ALGORITHMS, algorithm_for
from lib_sdcustom.ui import form

#: One row per method: (default lr, default text-encoder share, output kind, copied components, sections, token).
EXPECTED = {
    "lora": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "locon": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "loha": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "lokr": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "oft": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "boft": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "ia3": (3e-3, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "glora": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "prior"}, True),
    "textual_inversion": (5e-3, 0.0, OutputKind.EMBEDDING, set(), {"textual_inversion"}, False),
    "hypernetwork": (1e-5, 0.0, OutputKind.HYPERNETWORK, set(), {"hypernetwork"}, True),
    "dreambooth": (2e-6, 1.0, OutputKind.CHECKPOINT, {"unet", "text_encoder"}, {"dreambooth", "prior"}, True),
    "dreambooth_lora": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "dreambooth", "prior"}, True),
    "pivotal": (1e-4, 1.0, OutputKind.LORA, set(), {"network", "textual_inversion", "prior"}, False),
}


def test_every_method_has_a_row_here_and_a_flag_choice():
    assert set(EXPECTED) == set(METHODS)
    assert config_module.RunConfig.__dataclass_fields__["method"].metadata["choices"] == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_spec_facts_reach_the_config_and_the_hosts(method):
    lr, fraction, kind, copied, sections, token = EXPECTED[method]
    config = RunConfig(method=method)
    assert (config.lr, config.text_encoder_fraction) == (lr, fraction)
    assert output_kind(method) is kind and trained_in_place(method) == copied
    assert form.uses_token(method) is token
    assert {section for section in METHOD_SECTIONS if form.section_visible(section, method)} == sections
    assert config.uses_network is ("network" in sections)


@pytest.mark.parametrize("method", METHODS)
def test_spec_is_consistent_with_its_class_and_the_other_tables(method):
    spec = METHOD_SPECS[method]
    assert issubclass(spec.method_class(), Method)
    assert set(spec.sections) <= set(METHOD_SECTIONS) <= set(SECTIONS)
    assert spec.trained_in_place <= COMPONENTS
    assert spec.output in StandaloneHost.FOLDERS, "every output kind needs a host folder"
    if spec.uses_network:
        assert algorithm_for(method) is ALGORITHMS[spec.network_algorithm]
    else:
        with pytest.raises(ValueError):
            algorithm_for(method)


def test_textual_inversion_shares_the_hosts_text_encoder():
    """Its vectors sit in a hook on the embedding layer and the table is never resized or written (shown on a
    shared bundle by test_textual_inversion.py::test_loss_falls_while_the_base_stays_bit_identical), so a host
    need not copy the text encoder for it: inside the WebUI that copy cost memory and time for nothing."""
    assert trained_in_place("textual_inversion") == frozenset()


def test_snippets_name_the_result_as_the_host_expects():
    assert prompt_snippet("lora", "x") == "<lora:x:0.8>" and prompt_snippet("locon", "x", 1.0) == "<lora:x:1>"
    assert prompt_snippet("textual_inversion", "emb") == "emb"
    assert prompt_snippet("hypernetwork", "hn", 1.0) == "<hypernet:hn:1>"
    assert prompt_snippet("pivotal", "zwx", 1.0) == "<lora:zwx:1> zwx"
    assert prompt_snippet("dreambooth", "db") == "Select the checkpoint 'db' at the top of txt2img."


def test_a_cleared_method_dropdown_shows_the_common_sections_only():
    assert form.uses_token(None)
    assert [section for section in SECTIONS if form.section_visible(section, None)] == \
        [section for section in SECTIONS if section not in METHOD_SECTIONS]
