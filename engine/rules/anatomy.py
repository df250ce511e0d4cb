"""The anatomy table: body regions, the text patterns that name them, and how they relate.

File format (YAML, conf/anatomy.yaml):

    regions:
      CHEST:
        patterns: ['\\bTHORAX\\b', '\\bLUNGS?\\b']
        related: [NECK]
      CHESTABDPELVIS:
        patterns: ['\\bCAP\\b']
        includes: [CHEST, ABDOMEN, PELVIS]

Region names are DICOM Body Part Examined defined terms where one exists. A
region's own name always matches as a word. Two regions are related when they
are the same, when one includes the other, when both include a common region,
or when either lists the other under `related`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from engine.configfile import ConfigError, Problem, load_document, validate

REGION_PATTERN = r"^[A-Z][A-Z0-9_]*$"


class _RegionSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    patterns: list[str] = Field(default_factory=list)
    related: list[str] = Field(default_factory=list)
    includes: list[str] = Field(default_factory=list)


class _AnatomyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    regions: dict[str, _RegionSchema] = Field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Region:
    name: str
    patterns: tuple[re.Pattern[str], ...]
    related: frozenset[str]
    includes: frozenset[str]


class Anatomy:
    """Body regions with their patterns, inclusions and relations."""

    def __init__(self, regions: Mapping[str, Region], source: str = "") -> None:
        self.regions = dict(regions)
        self.source = source
        self._related: dict[str, set[str]] = {name: set() for name in self.regions}
        for region in self.regions.values():
            for other in region.related:
                self._related[region.name].add(other)
                self._related.setdefault(other, set()).add(region.name)

    @classmethod
    def empty(cls) -> Anatomy:
        return cls({})

    def __contains__(self, name: object) -> bool:
        return name in self.regions

    def __len__(self) -> int:
        return len(self.regions)

    def parts(self, name: str) -> set[str]:
        """Return the region and every region it includes, directly or through others."""
        found = {name}
        pending = [name]
        while pending:
            region = self.regions.get(pending.pop())
            if region is None:
                continue
            for part in region.includes - found:
                found.add(part)
                pending.append(part)
        return found

    def find_regions(
        self, text: str, extra_patterns: Mapping[str, Iterable[re.Pattern[str]]] | None = None
    ) -> tuple[str, ...]:
        """Return every region named in a free text (procedure text, study description)."""
        if not text:
            return ()
        extra_patterns = extra_patterns or {}
        names = list(self.regions) + [name for name in extra_patterns if name not in self.regions]
        found = []
        for name in names:
            patterns = [*extra_patterns.get(name, ()), _word(name)]
            region = self.regions.get(name)
            if region is not None:
                patterns.extend(region.patterns)
            if any(pattern.search(text) for pattern in patterns):
                found.append(name)
        return tuple(found)

    def outermost(self, names: Iterable[str]) -> tuple[str, ...]:
        """Drop regions that another of `names` covers: CHEST, ABDOMEN, ABDOMENPELVIS,
        CHESTABDPELVIS is CHESTABDPELVIS."""
        unique = list(dict.fromkeys(names))
        parts = {name: self._leaves(name) for name in unique}
        return tuple(
            name
            for name in unique
            if not any(other != name and parts[name] < parts[other] for other in unique)
        )

    def _leaves(self, name: str) -> set[str]:
        """Return the regions a region covers that include no others (itself if none)."""
        leaves = {
            part
            for part in self.parts(name)
            if part not in self.regions or not self.regions[part].includes
        }
        return leaves or {name}

    def covers(self, prior: str, ordered: str) -> str:
        """Return why a prior of region `prior` shows the `ordered` region, or ''."""
        if prior == ordered:
            return f"{prior} is the ordered region"
        if ordered in self.parts(prior):
            return f"{prior} includes {ordered}"
        return ""

    def relation(self, prior: str, ordered: str) -> str:
        """Return why region `prior` is related to region `ordered`, or '' if it is not."""
        covered = self.covers(prior, ordered)
        if covered:
            return covered
        if prior in self.parts(ordered):
            return f"{ordered} includes {prior}"
        shared = sorted((self.parts(prior) & self.parts(ordered)) - {prior, ordered})
        if shared:
            return f"{prior} and {ordered} both include {shared[0]}"
        if ordered in self._related.get(prior, set()):
            return f"{prior} is related to {ordered} in the anatomy table"
        return ""


def _word(name: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)


def compile_pattern(text: str) -> re.Pattern[str]:
    """Compile a region or description pattern: case-insensitive, found anywhere in the text."""
    return re.compile(text, re.IGNORECASE)


def load_anatomy(path: Path, display_name: str | None = None) -> Anatomy:
    """Load an anatomy table. Raises ConfigError listing every problem."""
    document = load_document(path, display_name)
    parsed = validate(document, _AnatomyFile)
    problems: list[Problem] = []
    regions: dict[str, Region] = {}
    names = set(parsed.regions)

    for name, spec in parsed.regions.items():
        base: tuple[str | int, ...] = ("regions", name)
        if not re.match(REGION_PATTERN, name):
            problems.append(
                document.problem(
                    base,
                    f"invalid region name '{name}'",
                    "use upper-case letters, digits and _, e.g. CHESTABDPELVIS",
                )
            )
        patterns = []
        for index, text in enumerate(spec.patterns):
            try:
                patterns.append(compile_pattern(text))
            except re.error as error:
                problems.append(
                    document.problem(
                        (*base, "patterns", index),
                        f"invalid regular expression '{text}': {error}",
                    )
                )
        for key in ("related", "includes"):
            for index, other in enumerate(getattr(spec, key)):
                if other not in names:
                    problems.append(
                        document.problem(
                            (*base, key, index),
                            f"unknown region '{other}'",
                            f"define it under regions; known: {', '.join(sorted(names))}",
                        )
                    )
        regions[name] = Region(
            name, tuple(patterns), frozenset(spec.related), frozenset(spec.includes)
        )

    anatomy = Anatomy(regions, document.file)
    for name in regions:
        if any(name in anatomy.parts(part) for part in regions[name].includes):
            problems.append(
                document.problem(
                    ("regions", name, "includes"),
                    f"region '{name}' includes itself through its parts",
                    "inclusions must not form a cycle",
                )
            )
    if problems:
        raise ConfigError(problems)
    return anatomy
