"""Bad input and faults through every surface: the CLI (`train`, `inspect`), the HTTP API and the page's
(gradio) endpoints. Each case asserts the exit code (or HTTP status), that the message names the problem
and the fix, that no traceback reaches the user, and that every file that existed before is
byte-identical afterwards. CLI cases run in-process (the parser and `main()` are what a shell runs);
cases about processes (signals, kill -9, a disk filling while a run trains) run real processes.

Small filesystems: a tmpfs mounted by the test (`mount -t tmpfs -o size=...`, needs root). Where mounting
is not permitted, those cases are skipped and their simulated twins (ENOSPC raised by the writer,
read-only through permission bits for a non-root user) still run; the skip reason says so.

Cases: 122 in the tables (CLI_CASES 88, INSPECT_CASES 16, API_CASES 12, PAGE_CASES 6) and 11 tests below them.

CLI, image folder: missing; empty; only text files; a text file named .png; a 1x1 image; a file instead of a
folder; a caption with bad bytes (stops, names the file and byte); a truncated PNG among good ones (trains,
one warning naming it); UTF-16 and UTF-16-BE captions with a BOM (read); a caption over 77 tokens (one
warning naming the file); odd but valid images (CMYK, 16-bit, alpha, palette, EXIF-rotated); caption
extension '.'; with --masked-loss a mask of another size than its picture, an all-black mask, a mask without
its picture.
CLI, options: rank 0 / 5000; alpha 0; lr -1 / nan; steps 0 / 1e12; resolution 100; resolution 64 with a
min bucket of 128 (names the bounds); batch size 0; caption dropout 1.5; repeats 0; train-text-encoder 2;
fp16 on the CPU; an unknown optimizer (argparse); Textual Inversion name with a space, 0 vectors; a hypernetwork
width the model does not have, a layer structure not starting with 1, a dropout structure of the wrong length; a
pivotal word CLIP knows, with a dot, or already an embedding's name (any case);
DreamBooth without instance prompt, without class prompt, with fp8 base, in style mode; a class folder missing
or empty without a class prompt, with an unreadable image, with an image without caption or class prompt; an
empty class prompt file; a negative prior weight; Textual Inversion with a class folder; a hypernetwork with
--plain-prompts on; --dora with LoHa, with (IA)^3, with fp8 base; --loraplus-lr-ratio with LoHa, at 0; OFT
with fp8 base, rank 1; BOFT rank 8 (SD's widths need 10), rank 11; zero-terminal-SNR on an epsilon model;
names '../x', '', 'a|b', 'CON', '.hidden'.
CLI, files: base missing; base a non-SD safetensors; base a .ckpt carrying a pickled object; base a
truncated safetensors; base a text file; --config missing / not TOML / unknown key; --resume of a folder
without config.toml / without run.json / whose state is another run's; a fresh run over another run's
state; an existing result; an existing NAME.json card or NAME.png preview with no result; --out a file;
--out under a file; --out read-only (tmpfs remounted read-only); --run-dir a file; --run-dir read-only;
a 2 MiB output disk for a LoRA of a few hundred KiB (trains); outputs readable by others under umask 022
(LoRA, Textual Inversion); stale temp files of a dead writer removed, a live writer's and the user's kept.
inspect: missing file; unknown extension; text named .safetensors; header length past the end; truncated
data; no tensors; a one-tensor file that is no embedding; an SD3 file; a FLUX file; a checkpoint without
text-encoder keys; a .ckpt with a pickled object (no weights_only advice); a .ckpt of garbage bytes; a
truncated zip .ckpt.
API (HTTP Basic u:p): no credentials; wrong password; unknown key; wrong type; image folder outside the
roots; output folder that is a root (run folder outside); checkpoint outside the checkpoint folder; an
existing result; an empty image folder; an unknown run id (status and cancel).
Page (the tab's callbacks gradio calls): check_folder on a missing folder, outside the roots, through a
symlink; train with no token, an existing result, an image folder outside the roots.
Processes: SIGINT (130) and SIGTERM (143) while training, each resumed to the end; SIGTERM while class
images are generated (143, the images made so far kept); kill -9 after a state save (no partial file
visible, resume exports, the dead writer's temp files removed); the output disk filling during training
(the export fails, the message names the saved weights and the resume command, which then exports); the
run-folder disk filling (a clear message, no traceback).
Also: reusing a run name (the new run's state survives, --resume continues it to the weights of an
uninterrupted run); a failing export simulated for both writers (OSError, safetensors' SafetensorError);
an internal error (one line, the traceback in a file); the CLI gives its signal handlers back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import cancel_at, write_images
from lib_sdcustom.cli import main

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """A pickled object a weights-only loader must refuse to build."""


# ----------------------------------------------------------------------------------------------- harness

@dataclass
class Workspace:
    """One case's folder: images, an output folder (not created), the shared tiny base model."""

    root: Path
    base: Path
    images: Path = field(init=False)

    def __post_init__(self) -> None:
        self.images = write_images(self.root / "images")

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def run_dir(self) -> Path:
        return self.root / "sdcustom-runs" / "x"

    def train(self, *extra: str, data: Path | None = None, base: Path | None = None, name: str = "x",
              out: Path | None = None) -> list[str]:
        return ["train", "--base", str(base or self.base), "--data", str(data or self.images), "--name", name,
                "--out", str(out or self.out), "--steps", "2", "--resolution", "64", "--sample-steps", "1",
                "--quiet", *extra]

    def folder(self, name: str, files: dict[str, bytes] | None = None) -> Path:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, data in (files or {}).items():
            (folder / file_name).write_bytes(data)
        return folder

    def caption(self, text: bytes, image: str = "img0") -> list[str]:
        (self.images / f"{image}.txt").write_bytes(text)
        return self.train()


def snapshot(*folders: Path) -> dict[Path, str]:
    files = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                files[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_untouched(before: dict[Path, str]) -> None:
    changed = [str(path) for path, digest in before.items()
               if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest]
    assert not changed, f"pre-existing files changed or removed: {changed}"


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses unknown choices itself
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def check_message(output: str, code: int, problem: str, fix: str) -> None:
    assert "Traceback" not in output, output
    assert problem.lower() in output.lower(), output
    if code == 2 and "invalid choice" not in output:
        assert "Fix:" in output, output
        assert fix.lower() in output.split("Fix:", 1)[1].lower(), output


# ----------------------------------------------------------------------------------------------- small disks

def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def small_disk(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A real small (or read-only) filesystem at `path`; skips where mounting is not permitted."""
    if not _mount_tmpfs(path, size, *options):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated twin of this case covers it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def read_only_folder(ws: Workspace, name: str) -> Path:
    """A folder writes fail in: a tmpfs mounted read-only, or permission bits for a non-root user."""
    folder = ws.root / name
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not _mount_tmpfs(folder, "1m", "ro"):
        pytest.skip("cannot mount a read-only tmpfs as root here")
    MOUNTS.append(folder)
    return folder


MOUNTS: list[Path] = []


@pytest.fixture(autouse=True)
def _unmount_after_case():
    yield
    while MOUNTS:
        subprocess.run(["umount", "-l", str(MOUNTS.pop())], capture_output=True)


# ----------------------------------------------------------------------------------------------- CLI table

def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _odd_images(ws: Workspace) -> list[str]:
    data = ws.folder("odd")
    rng = np.random.RandomState(0)
    rgb = Image.fromarray((rng.rand(80, 96, 3) * 255).astype("uint8"))
    rgb.convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray((rng.rand(72, 72) * 65535).astype("uint16")).save(data / "deep.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(data / "alpha.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(data / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb.save(data / "rotated.jpg", exif=exif)
    return ws.train("--batch-size", "2", data=data)


def _broken_png(ws: Workspace) -> list[str]:
    good = (ws.images / "img0.png").read_bytes()
    (ws.images / "broken.png").write_bytes(good[: len(good) // 2])
    return ws.train()


def _other_runs_state(ws: Workspace, *, with_run_file: bool = True) -> Path:
    """A run folder whose config.toml and run.json belong to one run and whose state to another."""
    state = ws.run_dir / "state" / "step-00000003"
    state.mkdir(parents=True)
    (state / "progress.json").write_text('{"format": 2, "step": 3, "run_id": "earlier"}')
    (ws.run_dir / "config.toml").write_text(f'method = "lora"\n[model]\nbase = "{ws.base}"\n[data]\n'
                                            f'data = "{ws.images}"\nresolution = 64\n[output]\nname = "x"\n'
                                            f'out = "{ws.out}"\n')
    if with_run_file:
        (ws.run_dir / "run.json").write_text('{"run_id": "current"}')
    return ws.run_dir


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Workspace], list[str]]
    code: int
    problem: str
    fix: str = ""
    check: Callable[[Workspace, str], None] | None = None
    removes: str = ""  # glob of pre-existing files the case is meant to remove


def _no_result(ws: Workspace, output: str) -> None:
    assert not (ws.out / "x.safetensors").exists()


def _once(word: str) -> Callable[[Workspace, str], None]:
    def check(ws: Workspace, output: str) -> None:
        assert output.count(word) == 1, output
        assert (ws.out / "x.safetensors").is_file()
    return check


def _trained(ws: Workspace, output: str) -> None:
    assert (ws.out / "x.safetensors").is_file()


def _readable_by_others(suffix: str) -> Callable[[Workspace, str], None]:
    def check(ws: Workspace, output: str) -> None:
        written = sorted(ws.out.glob("*"))
        assert any(path.suffix == suffix for path in written), written
        for path in written:
            assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))
    return check


def _stale_temporaries(ws: Workspace) -> list[str]:
    ws.out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ws.out / f".x.sdcustom-{dead.pid}.abc123.tmp").write_bytes(b"half a file")
    (ws.out / f".x.sdcustom-{os.getpid()}.live99.tmp").write_bytes(b"a live writer's")
    (ws.out / ".notes.tmp").write_bytes(b"the user's own")
    return ws.train()


def _stale_removed(ws: Workspace, output: str) -> None:
    left = sorted(path.name for path in ws.out.glob(".*"))
    assert left == sorted([f".x.sdcustom-{os.getpid()}.live99.tmp", ".notes.tmp"]), left
    assert (ws.out / "x.safetensors").is_file()


def _small_out_disk(ws: Workspace) -> list[str]:
    """Before, the free-space check asked 256 MiB for any result; this LoRA is a few hundred KiB."""
    if not _mount_tmpfs(ws.out, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    MOUNTS.append(ws.out)
    return ws.train()


def _existing(name: str, data: bytes) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        ws.folder("out", {name: data})
        return ws.train()
    return setup


def _mask(ws: Workspace, stem: str, *, size: tuple[int, int] | None = None, value: int = 255) -> list[str]:
    """A `STEM.mask.png` beside the pictures (the size of img0.png unless given), trained with --masked-loss."""
    with Image.open(ws.images / "img0.png") as picture:
        Image.new("L", size or picture.size, value).save(ws.images / f"{stem}.mask.png")
    return ws.train("--masked-loss")


def _embedding_named(word: str) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        folder = ws.folder("embeddings", {f"{word.upper()}.safetensors": b"someone's embedding"})
        return ws.train("--method", "pivotal", "--embeddings-dir", str(folder), name=word)
    return setup


def _fresh_over_other_state(ws: Workspace) -> list[str]:
    _other_runs_state(ws)
    return ws.train()


LONG_CAPTION = ("a photo of " + " ".join(f"word{i}" for i in range(100))).encode()

CLI_CASES = [
    # image folders
    Case("data missing", lambda ws: ws.train(data=ws.root / "nowhere"), 2, "does not exist", "Check the path"),
    Case("data empty", lambda ws: ws.train(data=ws.folder("empty")), 2, "No images", ".png"),
    Case("data only text", lambda ws: ws.train(data=ws.folder("t", {"notes.txt": b"hi"})), 2, "notes.txt", ".png"),
    Case("text named png", lambda ws: ws.train(data=ws.folder("f", {"photo.png": b"not an image"})), 2, "photo.png",
         "Replace"),
    Case("1x1 image", lambda ws: ws.train(data=_dot(ws)), 2, "dot.png", "64 px"),
    Case("data is a file", lambda ws: ws.train(data=ws.images / "img0.png"), 2, "is a file", "folder"),
    Case("caption bad bytes", lambda ws: ws.caption(b"caf\xe9 au lait"), 2, "img0.txt is not valid UTF-8", "UTF-8",
         _no_result),
    Case("truncated png skipped once", _broken_png, 0, "broken.png", check=_once("broken.png")),
    Case("caption utf-16 bom", lambda ws: ws.caption("sks dog, grass".encode("utf-16")), 0, "", check=_trained),
    Case("caption utf-16-be bom", lambda ws: ws.caption(b"\xfe\xff" + "sks dog".encode("utf-16-be")), 0, "",
         check=_trained),
    Case("caption over 77 tokens", lambda ws: ws.caption(LONG_CAPTION), 0, "img0.png (", check=_once("longer than")),
    Case("odd valid images", _odd_images, 0, "", check=lambda ws, output: (ws.out / "x.safetensors").is_file()),
    Case("mask of another size", lambda ws: _mask(ws, "img0", size=(32, 32)), 2, "is 32x32 pixels but its picture img0.png",
         "picture's own size"),
    Case("mask all black", lambda ws: _mask(ws, "img0", value=0), 2, "img0.mask.png is black everywhere",
         "Paint the subject white"),
    Case("mask without its picture", lambda ws: _mask(ws, "gone"), 2, "gone.mask.png has no training picture",
         "Put its picture beside it"),
    Case("caption extension dot", lambda ws: ws.train("--caption-extension", "."), 2, "not usable", ".txt"),
    # options
    Case("rank 0", lambda ws: ws.train("--rank", "0"), 2, "--rank is 0", "--rank 8"),
    Case("rank 5000", lambda ws: ws.train("--rank", "5000"), 2, "--rank is 5000", "at most 1024"),
    Case("alpha 0", lambda ws: ws.train("--alpha", "0"), 2, "--alpha is 0", "positive alpha"),
    Case("lr negative", lambda ws: ws.train("--lr", "-1"), 2, "--lr is -1", "positive learning rate"),
    Case("lr nan", lambda ws: ws.train("--lr", "nan"), 2, "--lr is nan", "positive learning rate"),
    Case("steps 0", lambda ws: ws.train("--steps", "0"), 2, "--steps is 0", "1 to 1,000,000"),
    Case("steps 1e12", lambda ws: ws.train("--steps", "1000000000000"), 2, "--steps is 1000000000000", "1 to 1,000,000"),
    Case("resolution 100", lambda ws: ws.train("--resolution", "100"), 2, "--resolution is 100", "multiple of 8"),
    Case("bucket bounds exclude resolution", lambda ws: ws.train("--min-bucket", "128"), 2,
         "--resolution 64 is outside the bucket range --min-bucket 128 to --max-bucket 128",
         "--min-bucket 64 --max-bucket 128"),
    Case("batch size 0", lambda ws: ws.train("--batch-size", "0"), 2, "Batch size", "--batch-size"),
    Case("caption dropout 1.5", lambda ws: ws.train("--caption-dropout", "1.5"), 2, "--caption-dropout is 1.5", "[0, 1)"),
    Case("repeats 0", lambda ws: ws.train("--repeats", "0"), 2, "--repeats is 0", "1 or more"),
    Case("train text encoder 2", lambda ws: ws.train("--train-text-encoder", "2"), 2, "--train-text-encoder is 2",
         "between 0"),
    Case("fp16 on cpu", lambda ws: ws.train("--mixed-precision", "fp16"), 2, "needs a CUDA GPU", "--mixed-precision no"),
    Case("unknown optimizer", lambda ws: ws.train("--optimizer", "adamx"), 2, "invalid choice"),
    Case("ti name with space", lambda ws: ws.train("--method", "textual_inversion", name="two words"), 2,
         "contains a space", "one made-up word"),
    Case("ti 0 vectors", lambda ws: ws.train("--method", "textual_inversion", "--vectors", "0"), 2, "--vectors is 0",
         "1-8 vectors"),
    Case("hypernetwork width the model lacks", lambda ws: ws.train("--method", "hypernetwork", "--hypernetwork-widths", "768"),
         2, "names [768], but the attentions of", "Use widths from [32, 64]"),
    Case("hypernetwork layers not 1..1", lambda ws: ws.train("--method", "hypernetwork", "--layer-structure", "2, 1"), 2,
         "does not start and end with 1", "'1, 2, 1'"),
    Case("hypernetwork dropout length", lambda ws: ws.train("--method", "hypernetwork", "--dropout-structure", "0, 0"), 2,
         "has 2 values for 3 layer sizes", "one dropout per layer size"),
    Case("pivotal word known", lambda ws: ws.train("--method", "pivotal", name="dog"), 2, "already knows",
         "made-up word"),
    Case("pivotal word has a dot", lambda ws: ws.train("--method", "pivotal", name="zwx.toy"), 2, "contains a '.'",
         "without dots"),
    Case("pivotal word is an embedding", _embedding_named("zwxx"), 2, "already uses the word 'zwxx'",
         "move that embedding"),
    Case("dreambooth no instance prompt", lambda ws: ws.train("--method", "dreambooth"), 2, "No instance prompt",
         "--instance-prompt"),
    Case("dreambooth no class prompt", lambda ws: ws.train("--method", "dreambooth", "--instance-prompt", "sks dog"), 2,
         "no class prompt", "--class-prompt"),
    Case("dreambooth fp8", lambda ws: ws.train("--method", "dreambooth", "--instance-prompt", "sks", "--fp8-base",
                                               "--no-prior-preservation"), 2, "fp8", "dreambooth_lora"),
    Case("class folder missing", lambda ws: ws.train("--class-data", str(ws.root / "reg")), 2, "does not exist",
         "--class-prompt"),
    Case("class folder empty", lambda ws: ws.train("--class-data", str(ws.folder("reg"))), 2, "holds no images",
         "put your regularization images there"),
    Case("class image unreadable", lambda ws: ws.train("--class-prompt", "a dog", "--class-data", str(ws.folder(
        "reg", {"good.png": (ws.images / "img0.png").read_bytes(), "bad.png": b"not a picture"}))), 2,
         "bad.png cannot be", "Remove or replace it"),
    Case("class image without caption", lambda ws: ws.train("--class-data", str(ws.folder(
        "reg", {"r.png": (ws.images / "img0.png").read_bytes()}))), 2, "has no caption", "--class-prompt"),
    Case("class prompt file empty", lambda ws: ws.train("--class-prompt-file", str(ws.folder("p", {"p.txt": b"\n"}) /
                                                                        "p.txt")), 2, "has no prompts", "one prompt per line"),
    Case("prior weight negative", lambda ws: ws.train("--class-prompt", "a dog", "--prior-weight", "-0.5"), 2,
         "--prior-weight is -0.5", "weight >= 0"),
    Case("textual inversion with class images", lambda ws: ws.train("--method", "textual_inversion", "--class-data",
                                                                    str(ws.folder("reg"))), 2,
         "Textual Inversion cannot train on class images", "--no-prior-preservation"),
    Case("hypernetwork with plain prompts", lambda ws: ws.train("--method", "hypernetwork", "--plain-prompts", "on"), 2,
         "--plain-prompts on asks for them", "--plain-prompts at auto or off"),
    Case("dreambooth style mode without [filewords]",
         lambda ws: ws.train("--method", "dreambooth", "--instance-prompt", "sks", "--class-prompt", "a dog", "--style"), 2,
         "Style mode is on with DreamBooth", "--style off"),
    Case("dora with loha", lambda ws: ws.train("--method", "loha", "--dora"), 2, "--dora is on with LoHa",
         "lora, locon, pivotal, dreambooth_lora"),
    Case("loraplus with loha", lambda ws: ws.train("--method", "loha", "--loraplus-lr-ratio", "16"), 2,
         "--loraplus-lr-ratio is 16.0 with LoHa", "lora, locon, pivotal, dreambooth_lora"),
    Case("loraplus ratio 0", lambda ws: ws.train("--loraplus-lr-ratio", "0"), 2, "--loraplus-lr-ratio is 0.0",
         "ratio above 0"),
    Case("dora with ia3", lambda ws: ws.train("--method", "ia3", "--dora"), 2, "--dora is on with (IA)", "--dora off"),
    Case("dora fp8", lambda ws: ws.train("--dora", "--fp8-base"), 2, "LoRA and --dora, which trains on the", "fp8_base off"),
    Case("oft fp8", lambda ws: ws.train("--method", "oft", "--fp8-base"), 2, "merged weights", "fp8_base off"),
    Case("oft rank 1", lambda ws: ws.train("--method", "oft", "--rank", "1"), 2, "a block of one channel cannot rotate",
         "--rank of 2 or more"),
    Case("boft rank 8", lambda ws: ws.train("--method", "boft", "--rank", "8"), 2, "blocks of 10 or more",
         "an even --rank of 10 or more"),
    Case("boft odd rank", lambda ws: ws.train("--method", "boft", "--rank", "11"), 2, "--rank is 11; BOFT",
         "an even --rank"),
    Case("zero terminal snr on epsilon", lambda ws: ws.train("--zero-terminal-snr"), 2, "predicts noise",
         "zero_terminal_snr off"),
    Case("name dotdot", lambda ws: ws.train(name="../x"), 2, "outside the output folder", "--out"),
    Case("name empty", lambda ws: ws.train(name=""), 2, "No output name", "--name"),
    Case("name pipe", lambda ws: ws.train(name="a|b"), 2, "cannot be used in a file name", "letters"),
    Case("name reserved", lambda ws: ws.train(name="CON"), 2, "reserved", "another name"),
    Case("name hidden", lambda ws: ws.train(name=".hidden"), 2, "hidden", "another name"),
    # files
    Case("base missing", lambda ws: ws.train(base=ws.root / "none.safetensors"), 2, "none.safetensors"),
    Case("base not sd", lambda ws: ws.train(base=_safetensors(ws.root / "other.safetensors",
                                                              {"encoder.weight": torch.zeros(3, 3)})), 2,
         "Stable Diffusion"),
    Case("base pickled object", lambda ws: ws.train(base=_evil_ckpt(ws.root / "evil.ckpt")), 2, "evil.ckpt",
         "safetensors"),
    Case("base truncated", lambda ws: ws.train(base=_truncated(ws.base, ws.root / "cut.safetensors")), 2,
         "cut.safetensors is not a readable .safetensors file: it is cut off", "download finished"),
    Case("base text file", lambda ws: ws.train(base=_text(ws.root / "notes.safetensors")), 2, "notes.safetensors"),
    Case("config missing", lambda ws: ["train", "--config", str(ws.root / "none.toml")], 2, "does not exist", "--config"),
    Case("config not toml", lambda ws: ["train", "--config", str(_text(ws.root / "bad.toml"))], 2, "not valid TOML",
         "Fix the file"),
    Case("config unknown key", lambda ws: ["train", "--config", str(_text(ws.root / "typo.toml", b"[data]\ndtaa = 1\n"))],
         2, "Unknown setting 'dtaa'", "Known settings"),
    Case("resume no config", lambda ws: ["train", "--resume", str(ws.folder("empty_run"))], 2, "no config.toml",
         "run folder"),
    Case("resume without run.json", lambda ws: ["train", "--resume", str(_other_runs_state(ws, with_run_file=False))], 2,
         "has no run.json", "without --resume"),
    Case("resume other run's state", lambda ws: ["train", "--resume", str(_other_runs_state(ws))], 2,
         "no saved state of the run its config.toml describes", "without --resume"),
    Case("fresh run over other state", _fresh_over_other_state, 2, "holds the saved state of an earlier run",
         "--overwrite"),
    Case("existing result", _existing("x.safetensors", b"precious"), 2, "already exists", "--overwrite"),
    Case("existing card only", _existing("x.json", b'{"notes": "mine"}'), 2, "x.json already exists", "--overwrite"),
    Case("existing preview only", _existing("x.png", b"my picture"), 2, "x.png already exists", "--overwrite"),
    Case("out is a file", lambda ws: ws.train(out=_text(ws.root / "out.txt")), 2, "out.txt is a file", "Choose a folder"),
    Case("out under a file", lambda ws: ws.train(out=_text(ws.root / "file") / "sub"), 2, "is a file, not a folder",
         "Choose a folder"),
    Case("out read-only", lambda ws: ws.train(out=read_only_folder(ws, "ro_out")), 2, "not writable", "writable folder"),
    Case("run dir is a file", lambda ws: ws.train("--run-dir", str(_text(ws.root / "runfile"))), 2,
         "run folder", "Choose a folder"),
    Case("run dir read-only", lambda ws: ws.train("--run-dir", str(read_only_folder(ws, "ro_run") / "r")), 2,
         "not writable", "writable folder"),
    Case("small output disk", _small_out_disk, 0, "", check=_trained),
    Case("lora readable by others", lambda ws: ws.train(), 0, "", check=_readable_by_others(".safetensors")),
    Case("embedding readable by others", lambda ws: ws.train("--method", "textual_inversion", "--init-text", "dog",
                                                             name="zwxx"), 0, "", check=_readable_by_others(".safetensors")),
    Case("stale temp files", _stale_temporaries, 0, "", check=_stale_removed, removes="out/.x.sdcustom-*.abc123.tmp"),
]


def _dot(ws: Workspace) -> Path:
    folder = ws.folder("dot")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    return folder


def _evil_ckpt(path: Path) -> Path:
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload()}, path)
    return path


def _text(path: Path, data: bytes = b"this is not what it claims to be\n") -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def workspace(tmp_path, tiny_checkpoint) -> Workspace:
    return Workspace(tmp_path, tiny_checkpoint)


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_cli(case: Case, workspace: Workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace.root)
    previous = os.umask(0o022)
    try:
        argv = case.setup(workspace)
        before = snapshot(workspace.root, workspace.base.parent)
        for removed in workspace.root.glob(case.removes) if case.removes else ():
            before.pop(removed)
        code, output = run_main(argv, capsys)
    finally:
        os.umask(previous)
    assert code == case.code, output
    check_message(output, code, case.problem, case.fix)
    assert_untouched(before)
    if case.code == 2:
        assert not list(workspace.out.glob("*.safetensors")) or (workspace.out / "x.safetensors").read_bytes() == b"precious"
    if case.check:
        case.check(workspace, output)


# ----------------------------------------------------------------------------------------------- inspect table

def _header_past_end(path: Path) -> Path:
    path.write_bytes((10**6).to_bytes(8, "little") + b'{"a": 1}')
    return path


def _checkpoint_like(path: Path, prefix: str) -> Path:
    return _safetensors(path, {f"{prefix}.0.attn.qkv.weight": torch.zeros(2, 2), "first_stage_model.x": torch.zeros(1)})


def _zip_ckpt_cut(path: Path) -> Path:
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(64, 64)}}, path)
    return _truncated(path, path, keep=0.6)


INSPECT_CASES = [
    Case("missing file", lambda ws: ["inspect", str(ws.root / "none.safetensors")], 2, "does not exist", "Check the path"),
    Case("unknown extension", lambda ws: ["inspect", str(_text(ws.root / "notes.txt"))], 2, "not a model file extension",
         "safetensors"),
    Case("text named safetensors", lambda ws: ["inspect", str(_text(ws.root / "t.safetensors"))], 2,
         "not a readable .safetensors", "download"),
    Case("header past end", lambda ws: ["inspect", str(_header_past_end(ws.root / "h.safetensors"))], 2,
         "header claims", "download"),
    Case("truncated data", lambda ws: ["inspect", str(_truncated(ws.base, ws.root / "cut.safetensors", keep=0.9))], 2,
         "it is cut off", "download finished"),
    Case("no tensors", lambda ws: ["inspect", str(_safetensors(ws.root / "e.safetensors", {}))], 2, "holds no tensors",
         "Stable Diffusion checkpoints"),
    Case("lone tensor", lambda ws: ["inspect", str(_safetensors(ws.root / "w.safetensors", {"w": torch.zeros(3, 3)}))], 2,
         "match no known layout", "Textual Inversion"),
    Case("sd3 file", lambda ws: ["inspect", str(_checkpoint_like(ws.root / "sd3.safetensors",
                                                                 "model.diffusion_model.joint_blocks"))], 0,
         "Family: SD3 / SD3.5 (MMDiT) - not supported"),
    Case("flux file", lambda ws: ["inspect", str(_checkpoint_like(ws.root / "flux.safetensors", "double_blocks"))], 0,
         "FLUX.1 - not supported"),
    Case("no text encoder keys", lambda ws: ["inspect", str(_safetensors(
        ws.root / "u.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}))], 0,
         "not a family SD Customize supports"),
    Case("ckpt pickled object", lambda ws: ["inspect", str(_evil_ckpt(ws.root / "evil.ckpt"))], 2,
         "pickled Python object", ".safetensors"),
    # Random bytes fail the unpickler in many ways; these seeds give UnpicklingError, IndexError, KeyError and
    # UnicodeDecodeError, each of which must read as a damaged file.
    *(Case(f"ckpt garbage {seed}",
           lambda ws, seed=seed: ["inspect", str(_text(ws.root / "g.ckpt", random.Random(seed).randbytes(300)))],
           2, "damaged, incomplete", "re-download") for seed in (0, 2, 20, 195)),
    Case("ckpt zip cut", lambda ws: ["inspect", str(_zip_ckpt_cut(ws.root / "z.ckpt"))], 2, "damaged, incomplete",
         "re-download"),
]


@pytest.mark.parametrize("case", INSPECT_CASES, ids=[case.id for case in INSPECT_CASES])
def test_inspect(case: Case, workspace: Workspace, capsys):
    argv = case.setup(workspace)
    before = snapshot(workspace.root)
    code, output = run_main(argv, capsys)
    assert code == case.code, output
    check_message(output, code, case.problem, case.fix)
    assert "weights_only" not in output, "inspect must never suggest unsafe loading"
    assert_untouched(before)


# ----------------------------------------------------------------------------------------------- API and page

@pytest.fixture(scope="module")
def server_root(tmp_path_factory, tiny_checkpoint) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("server")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    for item in tiny_checkpoint.parent.glob("tiny*"):
        (shutil.copytree if item.is_dir() else shutil.copyfile)(item, root / "models" / "Stable-diffusion" / item.name)
    (root / "models" / "Lora").mkdir()
    (root / "models" / "Lora" / "taken.safetensors").write_bytes(b"someone's lora")
    write_images(root / "data" / "images")
    (root / "data" / "empty").mkdir()
    write_images(root / "outside")
    (root / "data" / "escape").symlink_to(root / "outside", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def api(server_root):
    fastapi = pytest.importorskip("fastapi")
    from http_helpers import serve

    from lib_sdcustom.host.access import parse_credentials
    from lib_sdcustom.host.api import register_routes
    from lib_sdcustom.host.base import StandaloneHost
    from lib_sdcustom.run.manager import RunManager

    host = StandaloneHost(server_root / "models", data_roots=[server_root / "data"])
    app = fastapi.FastAPI()
    register_routes(app, RunManager(host), roots=host.facts().allowed_roots, credentials=parse_credentials("u:p"))
    with serve(app) as base:
        yield base


def _run(server_root: Path, **sections) -> dict:
    run = {"method": "lora", "checkpoint": "tiny.safetensors", "data": {"data": str(server_root / "data" / "images")},
           "output": {"name": "api_x"}}
    for section, values in sections.items():
        run[section] = {**run.get(section, {}), **values} if isinstance(values, dict) else values
    return run


API_CASES = [  # (id, method, path, payload from the server root, auth, status, problem, fix)
    ("no credentials", "POST", "/runs", lambda r: _run(r), None, 401, "Not authenticated", ""),
    ("wrong password", "GET", "/runs", None, ("u", "nope"), 401, "Incorrect username or password", ""),
    ("unknown key", "POST", "/runs", lambda r: _run(r, typo=1), ("u", "p"), 400, "Unknown setting 'typo'", "Top-level keys"),
    ("wrong type", "POST", "/runs", lambda r: _run(r, training={"steps": "many"}), ("u", "p"), 400,
     "steps must be a int", "Write a int"),
    ("data outside", "POST", "/runs", lambda r: _run(r, data={"data": str(r / "outside")}), ("u", "p"), 400,
     "outside the folders", "inside one of"),
    ("data through symlink", "POST", "/runs", lambda r: _run(r, data={"data": str(r / "data" / "escape")}), ("u", "p"),
     400, "outside the folders", "inside one of"),
    ("out is a root", "POST", "/runs", lambda r: _run(r, output={"out": str(r / "models")}), ("u", "p"), 400,
     "The run folder", "inside one of"),
    ("checkpoint escapes", "POST", "/runs", lambda r: _run(r, checkpoint="../../outside/x.safetensors"), ("u", "p"), 400,
     "is not in", "Pick a checkpoint"),
    ("existing result", "POST", "/runs", lambda r: _run(r, output={"name": "taken"}), ("u", "p"), 400, "already exists",
     "--overwrite"),
    ("empty image folder", "POST", "/runs", lambda r: _run(r, data={"data": str(r / "data" / "empty")}), ("u", "p"), 400,
     "No images", ".png"),
    ("unknown run", "GET", "/runs/nope", None, ("u", "p"), 404, "No run 'nope'", ""),
    ("cancel unknown run", "POST", "/runs/nope/cancel", None, ("u", "p"), 404, "No run 'nope'", ""),
]


@pytest.mark.parametrize("case", API_CASES, ids=[case[0] for case in API_CASES])
def test_api(case, api, server_root):
    from http_helpers import http

    _, method, path, payload, auth, status, problem, fix = case
    before = snapshot(server_root)
    code, body = http(f"{api}/sdcustom/v1{path}", payload(server_root) if payload else ({} if method == "POST" else None),
                      auth=auth, method=method)
    assert code == status, body
    detail = body["detail"]
    text = f"{detail['problem']}\nFix: {detail['fix']}" if isinstance(detail, dict) else str(detail)
    assert problem in text and fix in text and "Traceback" not in text, text
    assert_untouched(before)
    assert not (server_root / "sdcustom-runs").exists() and not (server_root / "outside" / "sdcustom-runs").exists()


@pytest.fixture(scope="module")
def page(server_root):
    from lib_sdcustom.host.base import StandaloneHost
    from lib_sdcustom.run.manager import RunManager
    from lib_sdcustom.ui import TabController

    host = StandaloneHost(server_root / "models", data_roots=[server_root / "data"])
    return TabController(host.facts(), RunManager(host))


def _form(controller, folder: Path, *, name: str = "page_x", token: str = "sks") -> list:
    from test_extension_standalone import values

    return values(controller, folder, name, token=token)


PAGE_CASES = [  # (id, callback, image folder from the server root, name, token, problem, fix)
    ("check missing folder", "check_folder", lambda r: r / "data" / "nowhere", "page_x", "sks", "does not exist",
     "Check the path"),
    ("check outside", "check_folder", lambda r: r / "outside", "page_x", "sks", "outside the folders", "inside one of"),
    ("check through symlink", "check_folder", lambda r: r / "data" / "escape", "page_x", "sks", "outside the folders",
     "inside one of"),
    ("train no token", "train", lambda r: r / "data" / "images", "page_x", "", "No token", ""),
    ("train existing result", "train", lambda r: r / "data" / "images", "taken", "sks", "already exists", "--overwrite"),
    ("train outside", "train", lambda r: r / "outside", "page_x", "sks", "outside the folders", "inside one of"),
]


@pytest.mark.parametrize("case", PAGE_CASES, ids=[case[0] for case in PAGE_CASES])
def test_page(case, page, server_root):
    _, callback, folder, name, token, problem, fix = case
    before = snapshot(server_root)
    values = _form(page, folder(server_root), name=name, token=token)
    html = page.check_folder(*values)[0] if callback == "check_folder" else page.train("", *values)[-1]
    assert "sdcustom-error" in html and "Fix:" in html and problem in html and fix in html, html
    assert "Traceback" not in html
    assert_untouched(before)


# ----------------------------------------------------------------------------------------------- run folders

def test_reusing_a_run_name_resumes_only_the_run_it_holds(workspace):
    """The old behaviour: the second run's cancel state was pruned at once (the earlier run's states sort
    after it), and --resume exported the earlier run's weights under the new run's metadata."""
    from lib_sdcustom.cli import build_parser, config_from_args
    from lib_sdcustom.errors import TrainingStopped
    from lib_sdcustom.run.train import train

    ws = workspace
    assert main(ws.train("--steps", "6", "--save-state-every", "2", "--name", "stale")) == 0  # keeps step 4 and 6
    other = write_images(ws.root / "other", seed=7)
    uninterrupted = ws.root / "uninterrupted"
    assert main(ws.train("--steps", "20", "--name", "stale", "--run-dir", str(uninterrupted / "run"), data=other,
                         out=uninterrupted)) == 0
    args = build_parser().parse_args(ws.train("--steps", "20", "--name", "stale", "--overwrite", data=other))
    cancel, stop_at_two = cancel_at(2)
    with pytest.raises(TrainingStopped) as stopped:
        train(config_from_args(args), callbacks=[stop_at_two], cancel=cancel)
    saved = Path(str(stopped.value.problem).split(" in ", 1)[1].rstrip("."))
    assert saved.is_dir() and saved.name == "step-00000002", "the state the message names exists"
    run_dir = ws.root / "sdcustom-runs" / "stale"
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    resumed, expected = load_file(str(ws.out / "stale.safetensors")), load_file(str(uninterrupted / "stale.safetensors"))
    for key in expected:  # the new run continued from its own step 2: the same weights as never stopping
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)
    metadata = __import__("safetensors").safe_open(str(ws.out / "stale.safetensors"), "pt").metadata()
    assert metadata["ss_steps"] == "20"


# ----------------------------------------------------------------------------------------------- processes

def _cli_process(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "lib_sdcustom", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


class StderrWatcher:
    """Collects a process's stderr in a thread and waits for a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(process.stderr.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert time.time() < deadline, f"no {text!r} in {self.lines}"
            time.sleep(0.05)

    @property
    def text(self) -> str:
        self.thread.join(30)
        return "".join(self.lines)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_with_state_and_the_resume_finishes(workspace, signum, code):
    ws = workspace
    process = _cli_process(ws.train("--steps", "400", "--save-state-every", "0"), ws.root)
    stderr = StderrWatcher(process)
    stderr.wait_for("Run folder:")
    process.send_signal(signum)
    assert process.wait(120) == code
    text = stderr.text
    assert "Stopped: Training was cancelled" in text and f"--resume {ws.run_dir}" in text and "Traceback" not in text
    assert not ws.out.exists() or not list(ws.out.iterdir())
    assert main(["train", "--resume", str(ws.run_dir), "--steps", "12", "--quiet"]) == 0
    assert (ws.out / "x.safetensors").is_file()


def test_sigterm_while_class_images_are_generated(workspace):
    ws = workspace
    argv = ws.train("--method", "dreambooth", "--instance-prompt", "a sks dog", "--class-prompt", "a dog",
                    "--num-class-images", "200", "--class-sample-steps", "2")
    process = _cli_process(argv, ws.root)
    stderr = StderrWatcher(process)
    stderr.wait_for("Generating class images:")
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 143
    text = stderr.text
    assert "Cancelled while generating class images" in text and "kept and reused" in text and "Traceback" not in text
    made = [path for path in ws.run_dir.rglob("*.png")]
    assert made, "the class images made so far are kept for the next start"


def test_kill_9_after_a_state_save_leaves_no_partial_file_and_resumes(workspace):
    ws = workspace
    process = _cli_process(ws.train("--steps", "400", "--save-state-every", "2"), ws.root)
    stderr = StderrWatcher(process)
    stderr.wait_for("Run folder:")
    deadline = time.time() + 120
    while len(list((ws.run_dir / "state").glob("step-*"))) < 2:
        assert time.time() < deadline and process.poll() is None, stderr.lines
        time.sleep(0.02)
    process.kill()
    process.wait(30)
    ws.out.mkdir(exist_ok=True)
    (ws.out / f".x.sdcustom-{process.pid}.cut.tmp").write_bytes(b"what a kill mid-write leaves")
    assert not (ws.out / "x.safetensors").exists()
    for state in (ws.run_dir / "state").glob("step-*"):
        assert (state / "progress.json").is_file(), "a state folder appears only complete"
    assert main(["train", "--resume", str(ws.run_dir), "--steps", "12", "--quiet"]) == 0
    assert (ws.out / "x.safetensors").is_file()
    assert not list(ws.out.glob(".*.tmp")), "the killed writer's temp file is removed"


def test_the_output_disk_filling_during_training_keeps_the_weights(workspace, capsys):
    ws = workspace
    with small_disk(ws.root / "disk", "4m") as disk:
        out = disk / "Lora"
        argv = ws.train("--steps", "60", "--save-state-every", "0", "--run-dir", str(ws.run_dir), out=out)
        process = _cli_process(argv, ws.root)
        stderr = StderrWatcher(process)
        stderr.wait_for("Run folder:")
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=4k"], capture_output=True)  # disk full
        assert process.wait(300) == 2
        text = stderr.text
        assert "Training finished, but the result could not be written" in text and "Traceback" not in text
        assert f"--resume {ws.run_dir}" in text and "The trained weights are saved in" in text
        assert not (out / "x.safetensors").exists()
        (disk / "filler").unlink()
        assert main(["train", "--resume", str(ws.run_dir), "--quiet"]) == 0
        assert (out / "x.safetensors").is_file() and not list(out.glob(".*.tmp"))


def test_the_run_folder_disk_filling_is_a_message(workspace):
    ws = workspace
    with small_disk(ws.root / "disk", "4m") as disk:
        argv = ws.train("--steps", "60", "--save-state-every", "20", "--run-dir", str(disk / "run"))
        process = _cli_process(argv, ws.root)
        stderr = StderrWatcher(process)
        stderr.wait_for("Run folder:")
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=4k"], capture_output=True)
        assert process.wait(300) == 2
        text = stderr.text
        assert "Could not save the training state" in text and "Free disk space" in text and "Traceback" not in text
        assert not (ws.out / "x.safetensors").exists()


def test_a_failing_export_names_the_weights_and_the_command_simulated(workspace, capsys, monkeypatch):
    """The disk-full export without a mount: the writer raises ENOSPC as a full disk does."""
    import errno

    from lib_sdcustom.formats import network_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(network_file, "write_atomically", full)
    code, output = run_main(workspace.train(), capsys)
    assert code == 2 and "Traceback" not in output, output
    assert "No space left on device" in output and f"--resume {workspace.run_dir}" in output
    monkeypatch.undo()
    assert main(["train", "--resume", str(workspace.run_dir), "--quiet"]) == 0
    assert (workspace.out / "x.safetensors").is_file()


def test_a_full_disk_reported_by_safetensors_is_a_message_simulated(workspace, capsys, monkeypatch):
    """safetensors raises its own SafetensorError (not OSError) for a full disk; embeddings use its writer."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # the embedding writer imports it when it writes
    run_dir = workspace.root / "sdcustom-runs" / "zwxx"
    code, output = run_main(workspace.train("--method", "textual_inversion", name="zwxx"), capsys)
    assert code == 2 and "Traceback" not in output, output
    assert "StorageFull" in output and f"--resume {run_dir}" in output and "The trained weights are saved in" in output


def test_the_cli_gives_the_signal_handlers_back(workspace, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert run_main(workspace.train(), capsys)[0] == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_an_internal_error_is_one_line_and_a_file(workspace, capsys, monkeypatch):
    import lib_sdcustom.run.train

    def broken(*args, **kwargs):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(lib_sdcustom.run.train, "train", broken)
    code, output = run_main(workspace.train(), capsys)
    assert code == 3 and "Traceback" not in output and "internal error RuntimeError: an invariant broke" in output
    details = Path(output.split("details in ", 1)[1].split()[0].rstrip("."))
    assert "Traceback" in details.read_text() and "an invariant broke" in details.read_text()
    details.unlink()
