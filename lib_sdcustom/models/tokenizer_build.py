"""Rebuild the bundled CLIP tokenizer files from open_clip's `bpe_simple_vocab_16e6.txt.gz`.

The transformers tokenizer files for SD (`vocab.json`, `merges.txt`) are a pure function of that BPE file, which
ships inside the open-clip-torch and openai-clip wheels. Building them here, instead of copying them from a hub
download, keeps their origin checkable: run

    python -m lib_sdcustom.models.tokenizer_build GZ_PATH OUT_DIR

and the output must equal the committed `clip_tokenizer/` folder byte for byte (tests/test_tokenizer.py checks it).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..files import write_atomically

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# The BPE file holds more merges than CLIP uses; CLIP keeps as many as fit a 49,152-entry vocabulary
# beside the 256 byte symbols (each also with '</w>') and the 2 special tokens.
MERGE_COUNT = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins that GPT-2 style BPE uses for raw bytes, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes follow, mapped to code
    points from 256 upwards so that no byte becomes whitespace or a control character inside a token.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


def read_merges(gz_path: Path) -> list[tuple[str, str]]:
    """The merge pairs CLIP uses: lines 1..MERGE_COUNT of the BPE file (line 0 is a header)."""
    try:
        with gzip.open(gz_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError) as exc:
        raise ConfigError(
            f"Cannot read the BPE file {gz_path}: {exc}.",
            "Pass the bpe_simple_vocab_16e6.txt.gz found in the open_clip folder of the open-clip-torch wheel.",
        ) from exc
    body = lines[1 : MERGE_COUNT + 1]
    pairs = [tuple(line.split()) for line in body]
    if len(pairs) != MERGE_COUNT or any(len(pair) != 2 for pair in pairs):
        raise ConfigError(
            f"{gz_path} does not hold {MERGE_COUNT} merge lines of two symbols after its header.",
            "Pass the unmodified bpe_simple_vocab_16e6.txt.gz from the open-clip-torch wheel.",
        )
    return pairs  # type: ignore[return-value]


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in CLIP's order: bytes, bytes with '</w>', each merge result, then bos and eos."""
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ConfigError(
            f"The merges give {len(vocab)} distinct tokens, not {VOCAB_SIZE}.",
            "Pass the unmodified bpe_simple_vocab_16e6.txt.gz from the open-clip-torch wheel.",
        )
    return vocab


def tokenizer_files(merges: Sequence[tuple[str, str]]) -> dict[str, str]:
    """File name -> exact text of each file in the tokenizer folder."""
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = dict(
        special,
        do_lower_case=True,
        model_max_length=MODEL_MAX_LENGTH,
        tokenizer_class="CLIPTokenizer",
        errors="replace",
        add_prefix_space=False,
    )
    return {
        # indent=0 puts one entry per line, so a change shows as a readable diff.
        "vocab.json": json.dumps(build_vocab(merges), ensure_ascii=False, indent=0) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True) + "\n",
    }


def build(gz_path: Path, out_dir: Path) -> list[Path]:
    """Write the tokenizer folder built from `gz_path` into `out_dir`; returns the files written."""
    written = []
    for name, text in tokenizer_files(read_merges(gz_path)).items():
        data = text.encode("utf-8")
        # Bytes, not text mode: the files must come out identical on every OS (no CRLF translation).
        written.append(write_atomically(out_dir / name, functools.partial(Path.write_bytes, data=data)))
    logger.info("Wrote CLIP tokenizer files to %s", out_dir)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gz_path", type=Path, help="bpe_simple_vocab_16e6.txt.gz from the open-clip-torch wheel")
    parser.add_argument("out_dir", type=Path, help="folder to write the tokenizer files into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.gz_path, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
