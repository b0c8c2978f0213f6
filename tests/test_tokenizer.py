"""The bundled CLIP tokenizer gives the same ids as open_clip's reference tokenizer.

The reference is open_clip's `SimpleTokenizer` (a copy of OpenAI's CLIP tokenizer), read from the installed
open-clip-torch package. Only its `tokenizer.py` is loaded, so torchvision and timm are not needed.

Known, documented differences (not bugs in our files):
- Padding: open_clip pads the 77-id sequence with 0, transformers pads with eos (49407), as SD expects.
  Only the part up to and including eos is compared.
- Text repair: open_clip and transformers 4.x's Python `CLIPTokenizer` clean text with ftfy (HTML entities,
  mojibake, full-width letters). The Rust-backed tokenizer (`CLIPTokenizerFast`, and `CLIPTokenizer` itself
  from transformers 5) only applies NFC and lower-casing, so it differs on exactly that kind of text.
- open_clip 3.x names its special tokens `<start_of_text>`/`<end_of_text>`; the ids (49406/49407) are the same.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lib_sdcustom.errors import ConfigError, ModelLoadError
from lib_sdcustom.models import tokenizer_build
from lib_sdcustom.models.tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir, load_clip_tokenizer

transformers = pytest.importorskip("transformers")

BOS, EOS = 49406, 49407
LONG_PROMPT = ", ".join(f"detail number {index} with intricate ornaments" for index in range(30))

PROMPTS = [
    "a photo of sks dog",
    "ohwx man standing on a beach, <lora:x:0.8>, <lyco:my_style:1.0:0.5>",
    "(masterpiece:1.2), [worst quality], {best}, score_9 | BREAK",
    "Café crème brûlée, naïve façade, Ångström, Straße",
    "東京の夜景, 桜の木, 中文提示词, 한국어",
    "emoji 🌸🔥👩‍👩‍👧 and flags 🇯🇵",
    "Hello, WORLD!!! ... what's up? I'm fine; you'd've known",
    "MiXeD CaSe PrOmPt, CamelCaseWord, ALLCAPS",
    "1234567 3.14159 1girl 2boys 1920x1080 -0.5e10 #42",
    "  multiple   spaces\tand\nnewlines ",
    "a" * 200,
    "",
    LONG_PROMPT,
]
# Text that ftfy repairs: a mojibake 'café', an HTML entity and full-width letters.
FTFY_PROMPTS = ["cafÃ© au lait", "Tom &amp; Jerry", "ＦＵＬＬＷＩＤＴＨ text"]


def _find_bpe_gz() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def reference():
    """open_clip's SimpleTokenizer, loaded from its file without importing the open_clip package."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    path = _find_bpe_gz().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def ours():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def ours_fast():
    return transformers.CLIPTokenizerFast.from_pretrained(str(bundled_tokenizer_dir()), local_files_only=True)


def _sd_ids(tokenizer, prompt: str) -> list:
    """Ids as SD trainers and the WebUI request them: 77 long, truncated, padded to max_length."""
    return tokenizer(prompt, max_length=77, padding="max_length", truncation=True).input_ids


def test_bundled_folder_holds_the_tokenizer_files():
    folder = bundled_tokenizer_dir()
    assert sorted(path.name for path in folder.iterdir()) == sorted(TOKENIZER_FILES)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 + 1 and merges[-1] == ""


def test_loaded_tokenizer_has_sd_special_tokens(ours):
    assert isinstance(ours, transformers.CLIPTokenizer)
    assert ours.model_max_length == 77
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (BOS, EOS, EOS, EOS)
    assert len(ours) == 49408
    assert ours("A Photo").input_ids == ours("a photo").input_ids == [BOS, 320, 1125, EOS]


def test_missing_folder_is_a_user_facing_error(tmp_path):
    with pytest.raises(ModelLoadError, match="vocab.json"):
        load_clip_tokenizer(tmp_path)


def test_loads_from_an_explicit_folder(tmp_path, ours):
    for name in TOKENIZER_FILES:
        (tmp_path / name).write_bytes((bundled_tokenizer_dir() / name).read_bytes())
    assert load_clip_tokenizer(tmp_path)("ohwx").input_ids == ours("ohwx").input_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_reference(prompt, reference, ours, ours_fast):
    expected = reference.encode(prompt)
    assert ours(prompt, add_special_tokens=False).input_ids == expected
    assert ours_fast(prompt, add_special_tokens=False).input_ids == expected


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sd_sequence_equals_reference_up_to_padding(prompt, reference, ours, ours_fast):
    expected = reference(prompt)[0].tolist()
    end = expected.index(EOS) + 1
    assert expected[end:] == [0] * (77 - end)  # open_clip pads with 0 ...
    for tokenizer in (ours, ours_fast):
        ids = _sd_ids(tokenizer, prompt)
        assert len(ids) == 77 and ids[0] == BOS
        assert ids[:end] == expected[:end]
        assert ids[end:] == [EOS] * (77 - end)  # ... transformers pads with eos.


def test_long_prompt_is_truncated_to_77_keeping_eos(reference, ours):
    assert len(reference.encode(LONG_PROMPT)) > 75
    ids = _sd_ids(ours, LONG_PROMPT)
    assert ids == reference(LONG_PROMPT)[0].tolist()
    assert ids[-1] == EOS and EOS not in ids[:-1]


@pytest.mark.parametrize("prompt", FTFY_PROMPTS)
def test_ftfy_repairs_match_reference_in_python_tokenizer(prompt, reference, ours):
    """The WebUI (transformers 4.30, ftfy installed) repairs this text exactly like open_clip."""
    if getattr(ours, "fix_text", None) is None:
        pytest.skip("this transformers' CLIPTokenizer does not clean text with ftfy (Rust-backed tokenizer)")
    assert ours(prompt, add_special_tokens=False).input_ids == reference.encode(prompt)


def test_builder_reproduces_committed_files(tmp_path):
    gz_path = _find_bpe_gz()
    if not gz_path.is_file():
        pytest.skip(f"{gz_path} is missing")
    written = tokenizer_build.build(gz_path, tmp_path)
    assert sorted(path.name for path in written) == sorted(TOKENIZER_FILES)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (bundled_tokenizer_dir() / name).read_bytes(), name


def test_builder_rejects_a_short_bpe_file(tmp_path):
    gz_path = tmp_path / "short.txt.gz"
    with gzip.open(gz_path, "wt", encoding="utf-8") as handle:
        handle.write("header\ni n\nt h\n")
    with pytest.raises(ConfigError, match="merge lines"):
        tokenizer_build.build(gz_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_byte_symbols_are_256_distinct_printable_characters():
    symbols = tokenizer_build.byte_symbols()
    assert len(set(symbols)) == 256
    assert not any(symbol.isspace() for symbol in symbols)
    assert symbols[:3] == ["!", '"', "#"]


def test_warns_when_ftfy_is_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` fail
    tokenizer = load_clip_tokenizer()
    if not hasattr(tokenizer, "fix_text"):
        pytest.skip("this transformers' CLIPTokenizer never uses ftfy")
    assert "ftfy is not installed" in caplog.text
