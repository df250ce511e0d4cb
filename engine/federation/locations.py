"""Which sites hold a study, and under which patient there: remembered from federated answers.

A retrieve asks here first; what is missing or older than the memory time is
asked again with a C-FIND by Study Instance UID. Lives on the reactor thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from engine.model import PatientIdentifier


@dataclasses.dataclass(frozen=True)
class Location:
    site: str
    remote: PatientIdentifier
    local: PatientIdentifier


class LocationMemory:
    def __init__(self, seconds: Callable[[], float], keep_seconds: float) -> None:
        self._seconds = seconds
        self.keep_seconds = keep_seconds
        self._studies: dict[str, dict[str, tuple[Location, float]]] = {}

    def remember(self, study_instance_uid: str, location: Location) -> None:
        now = self._seconds()
        self._studies.setdefault(study_instance_uid, {})[location.site] = (location, now)
        if len(self._studies) > 100_000:
            self.forget_expired()

    def locations(self, study_instance_uid: str) -> list[Location]:
        """Return the sites known to hold a study, in the order they were first seen."""
        deadline = self._seconds() - self.keep_seconds
        known = self._studies.get(study_instance_uid, {})
        return [location for location, seen in known.values() if seen >= deadline]

    def forget_expired(self) -> None:
        deadline = self._seconds() - self.keep_seconds
        for uid in list(self._studies):
            kept = {
                site: entry for site, entry in self._studies[uid].items() if entry[1] >= deadline
            }
            if kept:
                self._studies[uid] = kept
            else:
                del self._studies[uid]
