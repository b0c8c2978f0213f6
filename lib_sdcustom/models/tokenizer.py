"""The CLIP tokenizer that Stable Diffusion's text encoders use, loaded without the model hub.

Every SD family (SD1's ViT-L/14, the OpenCLIP towers of SD2 and SDXL) tokenizes with the same 49,408-entry
BPE vocabulary. We ship those files inside the package (built from open_clip's `bpe_simple_vocab_16e6.txt.gz`
by `tokenizer_build`) so that training works offline and never depends on a hub cache being present.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
EOS_TOKEN = "<|endoftext|>"
OPEN_CLIP_PAD_ID = 0  # '!' in CLIP's vocabulary; what open_clip pads with


def bundled_tokenizer_dir() -> Path:
    """The package folder that holds the bundled CLIP tokenizer files."""
    return Path(__file__).resolve().parent / "clip_tokenizer"


def load_clip_tokenizer(directory: Path | None = None, **overrides: Any) -> "CLIPTokenizer":
    """Load a transformers `CLIPTokenizer` from a local folder (the bundled files when `directory` is None).

    Only local files are read (`local_files_only=True`): a folder path must never turn into a hub lookup.
    `overrides` go to `from_pretrained` (special tokens).
    """
    from transformers import CLIPTokenizer

    folder = Path(directory) if directory is not None else bundled_tokenizer_dir()
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"The CLIP tokenizer folder {folder} lacks {', '.join(missing)}.",
            "Point to a folder holding vocab.json and merges.txt (a diffusers model's 'tokenizer' folder), "
            "or reinstall the extension to restore the bundled files.",
        )
    logger.debug("Loading CLIP tokenizer from %s", folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **overrides)
    # transformers 4.x's Python CLIPTokenizer cleans text with ftfy; without it, it falls back to a BERT
    # basic tokenizer that strips accents and splits CJK text, so ids no longer match the WebUI's.
    if hasattr(tokenizer, "fix_text") and tokenizer.fix_text is None:
        logger.warning("ftfy is not installed, so prompts with accents or CJK text tokenize differently from "
                       "the WebUI. Install it with: pip install ftfy")
    return tokenizer


def load_open_clip_tokenizer(directory: Path | None = None) -> "CLIPTokenizer":
    """The tokenizer of an OpenCLIP text encoder (SD2, SDXL's second): CLIP's vocabulary, padded with id 0.

    open_clip pads with 0 (the id of '!'), and the host does too for these encoders (`id_pad = 0` in its
    open_clip hijacks); SD1's tokenizer pads with the end token. diffusers' SD2 and SDXL `tokenizer_2` folders
    get id 0 by declaring `pad_token: "!"`, which also makes every '!' in a prompt a special token, so
    "wow!!" no longer tokenizes as open_clip does (huggingface/diffusers#4153). Here the pad token stays the
    end token while loading (so '!' is ordinary text) and only the padding id is set to 0 afterwards.
    """
    tokenizer = load_clip_tokenizer(directory, pad_token=EOS_TOKEN)
    tokenizer.pad_token_id = OPEN_CLIP_PAD_ID
    return tokenizer
