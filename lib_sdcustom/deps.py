"""Which of our requirements an environment lacks: shared by `install.py` and the tab's banner.

Standard library only (plus `packaging`, which pip itself vendors), because `install.py` imports it in the
host's venv before anything of ours is installed. A requirement counts as missing only when its
distribution is absent: a present one at another version belongs to the host or another extension, and
moving it could break them, so that case is reported, never "fixed".
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

try:
    from packaging.markers import Marker
    from packaging.requirements import InvalidRequirement, Requirement as _Parsed
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # a venv with pip but no standalone packaging
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement as _Parsed  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "requirements.txt"

#: diffusers 0.37+ fails to import its models beside transformers < 4.41 (the WebUI pins 4.30.2);
#: 0.36.0 is the newest that works there.
_DIFFUSERS_CAP_BELOW_TRANSFORMERS = ("4.41", "0.36.0")


def canonical_name(name: str) -> str:
    """PEP 503 normalisation, so 'PyYAML', 'pyyaml' and 'py_yaml' compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Requirement:
    name: str
    specifier: str  # e.g. ">=0.36.0,<0.43", possibly ""

    @property
    def key(self) -> str:
        return canonical_name(self.name)

    def pip_argument(self) -> str:
        return f"{self.name}{self.specifier}"

    def satisfied_by(self, version: str) -> bool:
        try:
            return SpecifierSet(self.specifier).contains(Version(version), prereleases=True)
        except InvalidVersion:
            return True  # an odd local version string is the host's business, not ours


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[Requirement]:
    """Requirement lines that apply to this interpreter (markers evaluated), comments skipped."""
    found: list[Requirement] = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            parsed = _Parsed(line)
        except InvalidRequirement as error:
            raise ValueError(f"{path}: cannot read the requirement {line!r}: {error}") from error
        if parsed.marker is not None and not Marker(str(parsed.marker)).evaluate():
            continue
        found.append(Requirement(parsed.name, str(parsed.specifier)))
    return found


def installed_versions() -> dict[str, str]:
    """Canonical distribution name -> version for everything importlib.metadata sees on sys.path."""
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version:
            versions.setdefault(canonical_name(name), version)  # first on sys.path wins, as for imports
    return versions


def fitted_to_host(requirements: Iterable[Requirement], installed: dict[str, str]) -> list[Requirement]:
    """Tighten our ranges where the host's installed versions demand it (the diffusers cap)."""
    limit, cap = _DIFFUSERS_CAP_BELOW_TRANSFORMERS
    transformers = installed.get("transformers")
    old_transformers = transformers is not None and _older_than(transformers, limit)
    fitted = []
    for requirement in requirements:
        if requirement.key == "diffusers" and old_transformers:
            requirement = Requirement(requirement.name, capped(requirement.specifier, cap))
        fitted.append(requirement)
    return fitted


def capped(specifier: str, cap: str) -> str:
    """`specifier` with the upper bound `<=cap`, written once: upper bounds above the cap are dropped (they no
    longer bind), and a lower bound at the cap makes it `==cap`. Lower bounds come first, as people write them."""
    ceiling = Version(cap)
    kept = [spec for spec in SpecifierSet(specifier)
            if not (spec.operator in ("<", "<=") and Version(spec.version) >= ceiling)]
    if any(spec.operator == ">=" and Version(spec.version) == ceiling for spec in kept):
        return "==" + cap
    lower = sorted(str(spec) for spec in kept if spec.operator.startswith(">"))
    rest = sorted(str(spec) for spec in kept if not spec.operator.startswith(">"))
    return ",".join(lower + rest + [f"<={cap}"])


def _older_than(version: str, limit: str) -> bool:
    try:
        return Version(version) < Version(limit)
    except InvalidVersion:
        return False


def missing(requirements: Iterable[Requirement], installed: dict[str, str]) -> list[Requirement]:
    return [requirement for requirement in requirements if requirement.key not in installed]


def mismatched(requirements: Iterable[Requirement], installed: dict[str, str]) -> list[str]:
    """'name version (we need SPEC)' for present distributions outside our range."""
    return [f"{r.name} {installed[r.key]} (we need {r.specifier})" for r in requirements
            if r.key in installed and not r.satisfied_by(installed[r.key])]


def constraints_text(installed: dict[str, str]) -> str:
    """`name==version` for every installed distribution: pip may add packages but move none."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()))


def missing_runtime(path: Path | None = None) -> list[str]:
    """Names of runtime requirements absent here (empty when the requirements file is not shipped)."""
    path = path or REQUIREMENTS_FILE
    if not path.is_file():
        return []
    installed = installed_versions()
    return [r.pip_argument() for r in missing(fitted_to_host(read_requirements(path), installed), installed)]
