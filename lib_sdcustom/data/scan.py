"""Find the training pictures in a folder, with their captions and repeat counts.

Layouts accepted (both may be mixed):
- images directly in the folder, each with an optional same-stem caption file (`dog1.png` + `dog1.txt`);
- kohya-style subfolders named `N_token class` (`10_sks dog`): every image inside is seen N times per
  epoch, and an image without a caption file is captioned with the folder's `token class` part.

Every image is read once here, hashed (the latent cache keys on content) and fully decoded, so a
damaged file is reported by name before training starts instead of crashing step 900. Unusable files are
skipped with a reason; the scan fails only when nothing usable is left. That is the slow part of checking a
run, so a `ScanCache` hands the same scan to every check of one run while the folder is unchanged.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .images import decode_rgb, truncated_images_undetectable


#: Formats Pillow decodes without extra plugins. GIF and multi-page TIFF use their first frame.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: A picture's loss mask (`masks.py`) beside it: `photo.mask.png` for `photo.png`; never a training picture itself.
MASK_SUFFIX = ".mask.png"
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
_SKIPPED_SHOWN_IN_ERRORS = 5


@dataclass(frozen=True)
class ImageRecord:
    """One usable training picture.

    `size` is (width, height) as trained, i.e. after EXIF rotation. `subfolder` is '' for images
    directly in the scanned folder. `caption_source` is 'file' (its caption file), 'folder' (the
    subfolder's or default caption) or 'none' (empty caption).
    """

    path: Path
    caption: str
    repeats: int
    subfolder: str
    size: tuple[int, int]
    sha256: str
    caption_source: str


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetScan:
    """What `scan_dataset` found: usable records in a stable order, plus what it left out and why."""

    folder: Path
    records: tuple[ImageRecord, ...]
    skipped: tuple[SkippedFile, ...]
    warnings: tuple[str, ...]

    @property
    def images_per_epoch(self) -> int:
        """Images seen per epoch, repeats included."""
        return sum(record.repeats for record in self.records)


@dataclass(frozen=True)
class _Group:
    """A directory whose images share a repeat count and a fallback caption."""

    directory: Path
    name: str
    repeats: int
    caption: str


def scan_dataset(folder: Path, *, caption_extension: str = ".txt", default_repeats: int = 1,
                 default_caption: str = "") -> DatasetScan:
    """Scan `folder` (see the module docstring for the layout).

    `default_repeats` and `default_caption` apply to images directly in `folder`; `default_caption` is
    what such an image without a caption file is trained with (e.g. 'sks dog').
    """
    folder = _existing_folder(folder)
    extension = _caption_extension(caption_extension)
    if isinstance(default_repeats, bool) or not isinstance(default_repeats, int) or default_repeats < 1:
        raise ConfigError(f"Repeats must be a whole number of at least 1, got {default_repeats!r}.",
                          "Set repeats to 1 or more.")
    warnings: list[str] = []
    skipped: list[SkippedFile] = []
    groups = [_Group(folder, "", default_repeats, default_caption.strip())]
    groups += _repeat_subfolders(folder, warnings)
    candidates = [(group, path) for group in groups for path in _image_files(group, warnings)]
    if not candidates:
        raise _no_images_error(folder, groups)

    records: list[ImageRecord] = []
    for group, path in candidates:
        record = _scan_image(path, group, extension, skipped, warnings)
        if record is not None:
            records.append(record)
    if not records:
        raise _nothing_usable_error(folder, skipped)
    warnings += _content_warnings(records)
    if truncated_images_undetectable():
        warnings.append("Pillow was told (by another extension) to accept truncated images, so damaged "
                        "files may train as partly grey pictures; check the folder if results look odd.")
    return DatasetScan(folder, tuple(records), tuple(skipped), tuple(warnings))


#: What a scan depends on in the file system: (path, size, modification time) of each entry it can read.
FolderState = tuple[tuple[str, int, int], ...]


def folder_state(folder: Path) -> FolderState | None:
    """The folder's and its subfolders' visible entries with their sizes and modification times: everything a
    scan reads (images, caption files, repeat folders). None when `folder` is not a readable folder, so the
    scan itself says what is wrong."""
    folder = Path(folder).expanduser()
    try:
        entries = [entry for top in _visible_entries(folder)
                   for entry in ([top, *_visible_entries(top)] if top.is_dir() else [top])]
        return tuple((str(entry), stat.st_size, stat.st_mtime_ns) for entry in entries for stat in [entry.stat()])
    except OSError:
        return None


class ScanCache:
    """The latest scan, handed out again while the folder's entries keep their sizes and modification times and
    the scan's options are the same. The tab's Check folder, the run manager's check before it takes the
    training slot and the run itself then decode each picture once between them; any change rescans."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the tab's check and a run's check may come from two threads
        self._latest: tuple[Any, DatasetScan] | None = None

    def scan(self, folder: Path, *, caption_extension: str = ".txt", default_repeats: int = 1,
             default_caption: str = "") -> DatasetScan:
        """`scan_dataset` with these arguments, or the kept scan when nothing it read has changed."""
        with self._lock:
            state = folder_state(folder)  # taken first: a file changed during the scan makes the next call rescan
            key = (str(Path(folder).expanduser().resolve()), caption_extension, default_repeats, default_caption, state)
            if state is not None and self._latest is not None and self._latest[0] == key:
                return self._latest[1]
            scan = scan_dataset(folder, caption_extension=caption_extension, default_repeats=default_repeats,
                                default_caption=default_caption)
            self._latest = (key, scan) if state is not None else None
            return scan
def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """('10_sks dog') -> (10, 'sks dog'); None when the name does not follow the `N_caption` pattern."""
    match = _REPEAT_FOLDER.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).strip()


#: Byte-order marks and the encoding they announce (Windows Notepad saves "Unicode" as UTF-16 LE with a BOM).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8, or UTF-8/16/32 with a byte-order mark; lines joined by ', '
    (one-tag-per-line files stay separate tags), surrounding whitespace removed. Raises `DatasetError`
    naming the file and the first bad byte for anything else."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"Cannot read caption file {path} ({error.strerror or error}).",
                           "Check the file's permissions.") from error
    bom, encoding = next(((bom, name) for bom, name in _BOMS if raw.startswith(bom)), (b"", "utf-8"))
    try:
        text = raw[len(bom):].decode(encoding)
    except UnicodeDecodeError as error:
        raise DatasetError(f"Caption file {path} is not valid {encoding.upper()} text (byte {error.start}: "
                           f"{raw[len(bom) + error.start:len(bom) + error.start + 1]!r}).",
                           "Re-save it as UTF-8 (most editors offer this in 'Save as'), or fix the damaged "
                           "characters.") from error
    lines = [line.strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


def _existing_folder(folder: Path) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DatasetError(f"The image folder {folder} does not exist.",
                           "Check the path (absolute, or relative to where the trainer runs).")
    if not folder.is_dir():
        raise DatasetError(f"{folder} is a file, not a folder of images.",
                           "Give the folder that contains the training images.")
    return folder


def _caption_extension(extension: str) -> str:
    extension = extension.strip()
    if not extension or extension in {".", "*"}:
        raise ConfigError(f"Caption extension {extension!r} is not usable.", "Use e.g. '.txt' or '.caption'.")
    return extension if extension.startswith(".") else f".{extension}"


def _visible_entries(directory: Path) -> list[Path]:
    """Entries in name order, without hidden ones (`.cache`, macOS `._photo.jpg` resource forks)."""
    return sorted((entry for entry in directory.iterdir() if not entry.name.startswith(".")),
                  key=lambda entry: entry.name)


def _repeat_subfolders(folder: Path, warnings: list[str]) -> list[_Group]:
    groups = []
    for entry in _visible_entries(folder):
        if not entry.is_dir():
            continue
        parsed = parse_repeat_folder(entry.name)
        if parsed is None:
            warnings.append(f"Ignoring subfolder {entry}: only subfolders named like '10_sks dog' "
                            "(repeats_caption) are used.")
        elif parsed[0] == 0:
            warnings.append(f"Ignoring subfolder {entry}: its name asks for 0 repeats.")
        else:
            groups.append(_Group(entry, entry.name, parsed[0], parsed[1]))
    return groups


def _image_files(group: _Group, warnings: list[str]) -> list[Path]:
    files = []
    for entry in _visible_entries(group.directory):
        if entry.is_dir():
            if group.name:
                warnings.append(f"Ignoring {entry}: folders inside '{group.name}' are not searched.")
        elif entry.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(entry):
            files.append(entry)
    return files


def _scan_image(path: Path, group: _Group, caption_extension: str, skipped: list[SkippedFile],
                warnings: list[str]) -> ImageRecord | None:
    """The record for one image, or None after noting in `skipped` and `warnings` why it is left out."""
    try:
        data = path.read_bytes()
        image = decode_rgb(data, path)
    except DatasetError as error:
        reason = error.problem
    except OSError as error:
        reason = f"Cannot read {path} ({error.strerror or error})."
    else:
        # An unreadable caption stops the scan instead of skipping the image: the user wrote that caption,
        # and training without the picture (or without its words) would be a silent loss.
        caption, source = _caption_for(path, group, caption_extension, warnings)
        return ImageRecord(path=path, caption=caption, repeats=group.repeats, subfolder=group.name,
                           size=image.size, sha256=hashlib.sha256(data).hexdigest(), caption_source=source)
    skipped.append(SkippedFile(path, reason))
    warnings.append(f"Skipped: {reason}")
    return None


def _caption_for(path: Path, group: _Group, caption_extension: str, warnings: list[str]) -> tuple[str, str]:
    caption_file = path.parent / f"{path.stem}{caption_extension}"
    if caption_file.is_file():
        caption = read_caption(caption_file)
        if caption:
            return caption, "file"
        fallback = f"the folder caption {group.caption!r}" if group.caption else "no caption"
        warnings.append(f"Caption file {caption_file} is empty; the image trains with {fallback}.")
    return (group.caption, "folder") if group.caption else ("", "none")


def _content_warnings(records: list[ImageRecord]) -> list[str]:
    warnings = []
    by_hash: dict[str, list[Path]] = {}
    for record in records:
        by_hash.setdefault(record.sha256, []).append(record.path)
    for paths in by_hash.values():
        if len(paths) > 1:
            warnings.append(f"Identical images (trained {len(paths)} times as often): "
                            + ", ".join(str(path) for path in paths))
    uncaptioned = sum(record.caption_source == "none" for record in records)
    if uncaptioned:
        warnings.append(f"{uncaptioned} of {len(records)} images have no caption file and no folder "
                        "caption; their [filewords] is empty (LoRA trains them with the output name).")
    return warnings


def _no_images_error(folder: Path, groups: list[_Group]) -> DatasetError:
    others = [entry.name for group in groups for entry in _visible_entries(group.directory) if entry.is_file()]
    found = (f"It holds {len(others)} other file(s), e.g. {', '.join(others[:3])}." if others
             else "It is empty.")
    return DatasetError(
        f"No images in {folder}. {found}",
        f"Put .png/.jpg/.webp images ({', '.join(IMAGE_EXTENSIONS)}) directly in the folder or in "
        "subfolders named like '10_sks dog'.",
    )


def _nothing_usable_error(folder: Path, skipped: list[SkippedFile]) -> DatasetError:
    shown = " ".join(item.reason for item in skipped[:_SKIPPED_SHOWN_IN_ERRORS])
    more = f" (and {len(skipped) - _SKIPPED_SHOWN_IN_ERRORS} more)" if len(skipped) > _SKIPPED_SHOWN_IN_ERRORS else ""
    return DatasetError(f"None of the {len(skipped)} images in {folder} can be used. {shown}{more}",
                        "Replace or re-export the damaged images (PNG or JPEG, at least 64 px a side).")
