"""The CLIP tokenizer that Stable Diffusion's text encoders use, loaded without the model hub.

Every SD family (SD1's ViT-L/14, the OpenCLIP towers of SD2 and SDXL) tokenizes with the same 49,408-entry
BPE vocabulary. We ship those files inside the package (built from open_clip's `bpe_simple_vocab_16e6.txt.gz`
by `tokenizer_build`) so that training works offline and never depends on a hub cache being present.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def bundled_tokenizer_dir() -> Path:
    """The package folder that holds the bundled CLIP tokenizer files."""
    return Path(__file__).resolve().parent / "clip_tokenizer"


def load_clip_tokenizer(directory: Optional[Path] = None) -> "CLIPTokenizer":
    """Load a transformers `CLIPTokenizer` from a local folder (the bundled files when `directory` is None).

    Only local files are read (`local_files_only=True`): a folder path must never turn into a hub lookup.
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
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    # transformers 4.x's Python CLIPTokenizer cleans text with ftfy; without it, it falls back to a BERT
    # basic tokenizer that strips accents and splits CJK text, so ids no longer match the WebUI's.
    if hasattr(tokenizer, "fix_text") and tokenizer.fix_text is None:
        logger.warning("ftfy is not installed, so prompts with accents or CJK text tokenize differently from "
                       "the WebUI. Install it with: pip install ftfy")
    return tokenizer
