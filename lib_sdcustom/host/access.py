"""Who may use a server, and which folders its requests may name: one layer for the HTTP API and the tab's
own (gradio) endpoints, so neither is a way around the other.

- `Credentials`: the `--api-auth user:password[,user:password]` pairs, checked in constant time. The API
  asks for them as HTTP Basic auth; the standalone page's gradio login (and `gradio_client`'s `auth=`)
  asks the same function.
- `PathRoots`: every file or folder a request names (base model, images, class images, output, run
  folder, template) must resolve, after `..` and symbolic links, inside one of the roots.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Iterable

from ..config import RunConfig
from ..errors import ConfigError

#: (section, field) of every setting that names a file or folder.
PATH_SETTINGS = (("model", "base"), ("data", "data"), ("prior", "class_data"), ("prior", "class_prompt_file"), ("output", "out"),
                 ("output", "run_dir"), ("output", "embeddings_dir"), ("textual_inversion", "template"))
_TEMPLATE_WORDS = {"object", "style", "captions"}


class Credentials:
    """User name -> password pairs, as `parse_credentials` reads them from `--api-auth`."""

    def __init__(self, pairs: dict[str, str]) -> None:
        self._pairs = dict(pairs)

    def allows(self, username: str, password: str) -> bool:
        expected = self._pairs.get(username)
        # compare_digest on both branches keeps the time the same for a known and an unknown user
        given = (password or "").encode()
        return secrets.compare_digest(given, (expected or "").encode()) and expected is not None


def parse_credentials(text: str | None) -> Credentials | None:
    """The host's `--api-auth user:password[,user2:password2]`; None when not set."""
    if not text:
        return None
    pairs = [item.partition(":") for item in text.split(",") if item.strip()]
    return Credentials({user.strip(): password for user, _, password in pairs})


class PathRoots:
    """The folders requests may name; everything else is refused with the list of allowed roots."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots: list[Path] = [Path(root).resolve() for root in roots]

    def contains(self, path: Path) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved == root or root in resolved.parents for root in self.roots)

    def confine(self, value: str, what: str) -> None:
        if not self.contains(Path(value)):
            allowed = ", ".join(str(root) for root in self.roots) or "(none configured)"
            raise ConfigError(f"{what} = {value!r} is outside the folders this server may use.",
                              f"Use a path inside one of: {allowed}.")

    def confine_config(self, config: RunConfig) -> None:
        """Refuse a config naming any path outside the roots, including the run folder it would default to."""
        for (section, name), value in _path_values(config):
            self.confine(value, f"[{section}] {name}")
        if (config.output.out or config.output.run_dir) and not self.contains(config.run_path):
            self.confine(str(config.run_path), "The run folder (by default OUT/../sdcustom-runs/NAME)")


def _path_values(config: RunConfig) -> list[tuple[tuple[str, str], str]]:
    found = []
    for section, name in PATH_SETTINGS:
        value = getattr(getattr(config, section), name)
        if value and not (name == "template" and value in _TEMPLATE_WORDS):
            found.append(((section, name), str(value)))
    return found
