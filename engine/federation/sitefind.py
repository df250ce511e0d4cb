"""A federated query at one site: blocking C-FINDs in the site's thread pool, streamed.

Sites are asked in the Study Root model (Patient Root for PATIENT level). A
relational site gets one query at the caller's level. Any other site is asked
level by level: STUDY first, then SERIES for each study found, then IMAGE for
each series, so that every request is a hierarchical one. Each answer at the
caller's level carries the attributes of its parents, PatientID included, so
the engine can tell whose entity it is.

The SiteHandle lets the reactor cancel the query (C-CANCEL to the site) or
abort the association when the site's time is up, from another thread.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.association import Association

from engine.dimse.scu import DimseError, NodeClient, make_interruptible
from engine.dimse.status import Status, describe, is_pending
from engine.federation.levels import RESPONSE_ATTRIBUTES, UNIQUE_KEYS, Level, Model

logger = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"


class QueryCancelled(Exception):
    """The site confirmed a C-CANCEL, or the query was cancelled before it was sent."""


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """The query for one site: the caller's keys with the site's patient ID, at a level."""

    site: str
    level: Level
    keys: Dataset
    relational: bool


class SiteHandle:
    """Cancel or abort one site's query from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._association: Association | None = None
        self._current: tuple[int, str] | None = None
        self.cancelled = False
        self.aborted = False

    def attach(self, association: Association, engine_stopping: Callable[[], bool]) -> None:
        with self._lock:
            self._association = association
            aborted = self.aborted
        if aborted:
            association.abort(block=False)
        make_interruptible(association, lambda: self.aborted or engine_stopping())

    def sending(self, message_id: int, sop_class: str) -> None:
        with self._lock:
            self._current = (message_id, sop_class)
            if not self.cancelled:
                return
        raise QueryCancelled()

    def finished(self) -> None:
        """Record that the running C-FIND got its final response: nothing left to cancel."""
        with self._lock:
            self._current = None

    def cancel(self) -> None:
        """Send C-CANCEL for the running C-FIND; further levels are not asked."""
        with self._lock:
            self.cancelled = True
            association, current = self._association, self._current
            # Sent under the lock, so never after finished(): a C-CANCEL (a
            # P-DATA) sent while the association is being released breaks
            # pynetdicom's state machine.
            if association is None or current is None or not association.is_established:
                return
            try:
                # Non-blocking: pynetdicom queues the PDU for its own network thread.
                association.send_c_cancel(current[0], query_model=current[1])
            except Exception as error:
                logger.warning("C-CANCEL could not be sent: %s", error)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            association = self._association
        if association is not None:
            association.abort(block=False)


def split_by_level(model: Model, keys: Dataset, default: Level) -> dict[Level, list[DataElement]]:
    by_level: dict[Level, list[DataElement]] = {level: [] for level in Level}
    for element in keys:
        if element.keyword in RESPONSE_ATTRIBUTES or element.tag.group == 0:
            continue
        by_level[model.level_of(element.keyword, default)].append(element)
    return by_level


def run_site_find(
    client: NodeClient, plan: SitePlan, handle: SiteHandle, emit: Callable[[Dataset], None]
) -> int:
    """Query one site and pass every match at the plan's level to `emit`; return their count."""
    contexts = [
        build_context(Model.STUDY_ROOT.find_sop_class),
        build_context(Model.PATIENT_ROOT.find_sop_class),
    ]
    count = 0
    with client.associate(contexts) as association:
        handle.attach(association, lambda: client.tracker.closed)
        finder = _Finder(client, association, handle)
        for answer in _answers(finder, plan):
            emit(answer)
            count += 1
    return count


class _Finder:
    def __init__(self, client: NodeClient, association: Association, handle: SiteHandle) -> None:
        self.client = client
        self.association = association
        self.handle = handle

    def find(self, model: Model, query: Dataset) -> Iterator[Dataset]:
        message_id = self.client.next_message_id()
        self.handle.sending(message_id, model.find_sop_class)
        _set_charset(query)
        responses = self.association.send_c_find(query, model.find_sop_class, msg_id=message_id)
        for status, identifier in responses:
            if status is None or "Status" not in status:
                self.handle.finished()
                raise DimseError(f"C-FIND at {self.client.node}: no response (timeout or abort)")
            code = int(status.Status)
            if is_pending(code):
                if identifier is not None:
                    identifier.decode()
                    yield identifier
                continue
            self.handle.finished()
            if code == Status.CANCEL:
                raise QueryCancelled()
            elif code != Status.SUCCESS:
                raise DimseError(
                    f"C-FIND at {self.client.node} failed with status {describe(code)}"
                )


def _answers(finder: _Finder, plan: SitePlan) -> Iterator[Dataset]:
    if plan.level is Level.PATIENT:
        by_level = split_by_level(Model.PATIENT_ROOT, plan.keys, Level.PATIENT)
        query = _query(Level.PATIENT, by_level[Level.PATIENT], {"PatientID": ""})
        yield from finder.find(Model.PATIENT_ROOT, query)
        return

    by_level = split_by_level(Model.STUDY_ROOT, plan.keys, plan.level)
    if plan.relational:
        elements = [element for level in Level for element in by_level[level]]
        extra = {"PatientID": "", "IssuerOfPatientID": ""}
        for level in (Level.STUDY, Level.SERIES, Level.IMAGE):
            if level <= plan.level:
                extra[UNIQUE_KEYS[level]] = ""
        yield from finder.find(Model.STUDY_ROOT, _query(plan.level, elements, extra))
        return
    yield from _descend(finder, plan, by_level, Level.STUDY, Dataset())


def _descend(
    finder: _Finder,
    plan: SitePlan,
    by_level: dict[Level, list[DataElement]],
    level: Level,
    parent: Dataset,
) -> Iterator[Dataset]:
    extra = {UNIQUE_KEYS[level]: ""}
    if level is Level.STUDY:
        extra.update({"PatientID": "", "IssuerOfPatientID": ""})
    query = _query(level, by_level[level], extra)
    for above in (Level.STUDY, Level.SERIES):
        if above < level:
            keyword = UNIQUE_KEYS[above]
            setattr(query, keyword, parent.get(keyword, ""))

    answers = list(finder.find(Model.STUDY_ROOT, query)) if level < plan.level else None
    if answers is None:
        for answer in finder.find(Model.STUDY_ROOT, query):
            yield _with_parent(answer, parent)
        return
    for answer in answers:
        if not str(answer.get(UNIQUE_KEYS[level], "") or ""):
            continue
        yield from _descend(finder, plan, by_level, Level(level + 1), _with_parent(answer, parent))


def _query(level: Level, elements: list[DataElement], extra: dict[str, str]) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level.name
    for element in elements:
        query.add(DataElement(element.tag, element.VR, element.value))
    for keyword, value in extra.items():
        if keyword not in query:
            setattr(query, keyword, value)
    return query


def _with_parent(answer: Dataset, parent: Dataset) -> Dataset:
    """Add copies of the parent's attributes to a match, because matches are changed later."""
    for element in parent:
        if element.tag not in answer:
            answer.add(copy.deepcopy(element))
    return answer


def _set_charset(query: Dataset) -> None:
    """Declare UTF-8 when a key has text outside the default repertoire."""
    for element in query:
        if isinstance(element.value, str) and not element.value.isascii():
            query.SpecificCharacterSet = UTF8
            return
        if element.VR == "PN" and element.value is not None and not str(element.value).isascii():
            query.SpecificCharacterSet = UTF8
            return
