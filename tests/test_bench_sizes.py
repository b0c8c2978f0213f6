"""`bench sizes` on full SD1.5 shapes, held to rules that do not depend on how it counts: a LoRA file doubles
with the rank, DoRA adds a little, (IA)^3 ignores the rank."""

from __future__ import annotations

import pytest

from lib_sdcustom.bench import network_sizes
from lib_sdcustom.models.bundle import ModelFamily


def test_lora_file_doubles_with_the_rank_and_ia3_ignores_it():
    lora8, lora16 = (network_sizes.file_bytes(ModelFamily.SD1, "lora", rank, False) for rank in (8, 16))
    dora8 = network_sizes.file_bytes(ModelFamily.SD1, "lora", 8, True)
    assert lora16 - lora8 == pytest.approx(lora8, rel=0.02)  # the header grows a little, the tensors double
    assert lora8 < dora8 < 1.1 * lora8  # one [1, in] row per module beside the rank-8 pair
    assert network_sizes.file_bytes(ModelFamily.SD1, "ia3", 8, False) == network_sizes.file_bytes(ModelFamily.SD1, "ia3", 16, False)
