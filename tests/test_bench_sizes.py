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


def test_resident_accounting_counts_what_each_side_keeps_on_the_gpu():
    """`bench resident` on full SD1.5 shapes: both sides train the same LoRA parameters, and ours now keeps
    neither the text encoder nor the VAE on the GPU during the steps, which the table's totals show."""
    from lib_sdcustom.bench import resident

    rows = {row.what.split(" (")[0].split(",")[0]: row for row in
            resident.rows(ModelFamily.SD1, rank=8, captions=3, batch=2, resolution=512)}
    lora = rows["LoRA weights"]
    assert lora.ours_now == lora.reference and lora.ours_now > 0
    assert rows["AdamW moments"].ours_now == 2 * lora.ours_now
    for parked in ("text encoder 1", "VAE"):
        assert rows[parked].ours_before and rows[parked].reference and rows[parked].ours_now is None
    assert rows["VAE"].ours_before == 2 * rows["VAE"].reference  # fp32 against bf16
    cache = rows["text-encoder cache"]
    assert cache.ours_now * 2 == cache.reference * 3  # 3 captions against one batch of 2
    text = resident.report(ModelFamily.SD1, rank=8, captions=3, batch=2, resolution=512)
    parked = rows["text encoder 1"].ours_before + rows["VAE"].ours_before
    totals = [float(cell.strip(" *")) for cell in text.splitlines()[-1].split("|")[2:5]]
    assert totals[0] - totals[1] == pytest.approx(parked / 2**30, abs=0.01)
