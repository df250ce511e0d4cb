"""Polling Modality Worklists: every scheduled step in the look-ahead window becomes an order.

Each step goes through the same planner (routes, rules, jobs) as an HL7 order and is
stored as a message of type MWL, so a step seen again on the next poll is a
duplicate and creates nothing. A step that leaves the worklist before it starts
becomes a cancel. A worklist that is down, slow or returns malformed items is
logged and polled again at the next interval.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
from collections.abc import Callable, Generator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from engine.config import WorklistSettings, WorklistSource
from engine.dimse.pools import NodePools
from engine.dimse.scu import NodeClient
from engine.dimse.worklist import (
    MalformedItem,
    WorklistItem,
    answer_keys,
    find_worklist,
    read_item,
    worklist_query,
)
from engine.hl7.events import IdentifierPolicy
from engine.jobs.planner import Plan
from engine.jobs.store import AsyncStore, Store
from engine.model import DomainEvent, MessageOrigin
from engine.worklist import orders, steps

logger = logging.getLogger(__name__)

EventPlanner = Callable[[DomainEvent], Plan]


@dataclasses.dataclass
class PollResult:
    """The outcome of one poll of one worklist: the steps it found and what it recorded."""

    node: str
    items: list[WorklistItem] = dataclasses.field(default_factory=list)
    malformed: list[str] = dataclasses.field(default_factory=list)
    # Keys of malformed matches: a known step that turned malformed is kept, not cancelled.
    malformed_keys: set[str] = dataclasses.field(default_factory=set)
    outside_window: int = 0
    new_orders: list[tuple[WorklistItem, str]] = dataclasses.field(default_factory=list)
    already_seen: list[WorklistItem] = dataclasses.field(default_factory=list)
    removed: list[tuple[WorklistItem, str]] = dataclasses.field(default_factory=list)
    error: str = ""


def queries_for(source: WorklistSource, start: dt.datetime, end: dt.datetime) -> list[Dataset]:
    """Build one query per (station, modality) pair of the filters; universal where one is empty."""
    stations: Sequence[str] = source.station_ae_titles or [""]
    modalities: Sequence[str] = source.modalities or [""]
    return [
        worklist_query(start, end, modality=modality, station=station)
        for station, modality in itertools.product(stations, modalities)
    ]


def select_items(
    source: WorklistSource,
    answers: list[Dataset],
    start: dt.datetime,
    end: dt.datetime,
    result: PollResult,
) -> None:
    """Add each well-formed match in the window and the filters to result.items, once."""
    seen: set[str] = set()
    for answer in answers:
        try:
            item = read_item(answer)
        except MalformedItem as error:
            result.malformed.append(str(error))
            result.malformed_keys |= answer_keys(answer)
            continue
        if item.key in seen:
            continue
        seen.add(item.key)
        if item.start is None or not start <= item.start <= end:
            result.outside_window += 1
            continue
        if source.station_ae_titles and item.station_ae_title not in source.station_ae_titles:
            continue
        if source.modalities and item.modality not in source.modalities:
            continue
        result.items.append(item)


class WorklistPoller:
    """Polls every configured worklist on a timer, on the reactor; C-FINDs run in node pools."""

    def __init__(
        self,
        settings: WorklistSettings,
        clients: dict[str, NodeClient],
        pools: NodePools,
        db: AsyncStore,
        planner: EventPlanner,
        policy: IdentifierPolicy,
        clock: IReactorTime,
        on_jobs_created: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.pools = pools
        self.db = db
        self.planner = planner
        self.policy = policy
        self.clock = clock
        self.on_jobs_created = on_jobs_created
        self._loop: task.LoopingCall | None = None
        self._polling: defer.Deferred[list[PollResult]] | None = None

    def start(self) -> None:
        if not self.settings.sources:
            return
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.poll_seconds, now=True)
        logger.info(
            "polling %d worklist(s) every %ss, %sh ahead",
            len(self.settings.sources),
            self.settings.poll_seconds,
            self.settings.look_ahead_hours,
        )

    def stop(self) -> defer.Deferred[Any]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._polling is not None:
            return self._polling
        return defer.succeed(None)

    def _tick(self) -> None:
        # A poll still running (a slow worklist) is not started a second time.
        if self._polling is None:
            self._polling = self.poll_all()
            self._polling.addBoth(self._poll_done)

    def _poll_done(self, result: Any) -> Any:
        self._polling = None
        return None

    def window(self) -> tuple[dt.datetime, dt.datetime]:
        """Return the window of start times polled, in local time as worklists give it."""
        now = dt.datetime.fromtimestamp(self.clock.seconds())
        start = now - dt.timedelta(minutes=self.settings.grace_minutes)
        return start, now + dt.timedelta(hours=self.settings.look_ahead_hours)

    @defer.inlineCallbacks
    def poll_all(
        self, dry_run: bool = False
    ) -> Generator[defer.Deferred[Any], Any, list[PollResult]]:
        results = []
        for source in self.settings.sources:
            result = yield self.poll(source, dry_run)
            results.append(result)
        return results

    @defer.inlineCallbacks
    def poll(
        self, source: WorklistSource, dry_run: bool = False
    ) -> Generator[defer.Deferred[Any], Any, PollResult]:
        """Poll one worklist. A failure is reported in the result and the log, not raised."""
        result = PollResult(source.node)
        start, end = self.window()
        try:
            answers: list[Dataset] = []
            client = self.clients[source.node]
            for query in queries_for(source, start, end):
                found = yield self.pools.run(source.node, find_worklist, client, query)
                answers.extend(found)
            select_items(source, answers, start, end, result)
            # Applying the items finds more malformed ones (an issuer of another domain).
            yield self._apply(result, start, end, dry_run)
            for reason in sorted(set(result.malformed)):
                logger.warning(
                    "worklist %s: skipped %d malformed item(s): %s",
                    source.node,
                    result.malformed.count(reason),
                    reason,
                )
        except Exception as error:
            result.error = str(error)
            logger.warning(
                "worklist %s: poll failed, next try in %ss: %s",
                source.node,
                self.settings.poll_seconds,
                error,
            )
        return result

    def _apply(
        self, result: PollResult, start: dt.datetime, end: dt.datetime, dry_run: bool
    ) -> defer.Deferred[None]:
        now = dt.datetime.fromtimestamp(self.clock.seconds(), dt.UTC)
        applied = self.db.run(
            lambda store: self._apply_in_store(store, result, start, end, now, dry_run)
        )

        def wake_worker(created_jobs: bool) -> None:
            if created_jobs:
                self.on_jobs_created()

        return applied.addCallback(wake_worker)

    def _apply_in_store(
        self,
        store: Store,
        result: PollResult,
        start: dt.datetime,
        end: dt.datetime,
        now: dt.datetime,
        dry_run: bool,
    ) -> bool:
        """Record new, rescheduled and removed steps on the store thread.

        Returns True when new jobs were created.
        """
        node = result.node
        created_jobs = False
        for item in result.items:
            known = steps.known_step(store, node, item.key)
            if known is None and item.legacy_key != item.key:
                # A step recorded by an earlier version, under its SPS ID alone.
                legacy = steps.known_step(store, node, item.legacy_key)
                if legacy is not None and legacy.item.key == item.key:
                    known = legacy
                    if not dry_run:
                        steps.forget(store, node, item.legacy_key)
            if known is not None and not known.removed and known.item.same_order(item):
                result.already_seen.append(item)
                if not dry_run:
                    steps.remember(store, node, item, now)
                continue
            try:
                event = orders.placed(node, item, self.policy)
                if known is not None and store.has_message(event.origin):
                    # This version repeats an earlier one (a removed step is back, a
                    # patient corrected back), whose order ended: it needs one of its own.
                    again = f"/again@{now:%Y%m%d%H%M%S}"
                    event = orders.placed(node, item, self.policy, again)
            except MalformedItem as error:
                result.malformed.append(str(error))
                continue
            plan = self.planner(event)
            result.new_orders.append((item, plan.outcome))
            if dry_run:
                continue
            if known is not None and not known.removed:
                # Rescheduled, or moved to another patient or study: the old version is
                # withdrawn, the new one ordered.
                self._record(store, orders.removed(node, known.item, self.policy, now), now)
            duplicate = self._record_event(store, event, plan, item, now)
            created_jobs |= bool(plan.jobs) and not duplicate
            steps.remember(store, node, item, now)

        present = steps.keys(result.items)
        for missing in steps.present_between(store, node, start, end):
            if missing.key in present:
                continue
            if {missing.key, missing.legacy_key} & result.malformed_keys:
                logger.warning(
                    "worklist %s: step %s is malformed now; its order stays until the"
                    " worklist shows it again or drops it",
                    node,
                    missing.key,
                )
                continue
            cancel = orders.removed(node, missing, self.policy, now)
            outcome = self._record(store, cancel, now, dry_run)
            result.removed.append((missing, outcome))
            if not dry_run:
                steps.mark_removed(store, node, missing.key, now)

        logger.info(
            "worklist %s: %d step(s) in the window, %d new, %d removed, %d malformed",
            node,
            len(result.items),
            len(result.new_orders),
            len(result.removed),
            len(result.malformed),
        )
        return created_jobs

    def _record(
        self, store: Store, event: DomainEvent, now: dt.datetime, dry_run: bool = False
    ) -> str:
        plan = self.planner(event)
        if not dry_run:
            self._store(store, event.origin, plan, b"", now)
        return plan.outcome

    def _record_event(
        self, store: Store, event: DomainEvent, plan: Plan, item: WorklistItem, now: dt.datetime
    ) -> bool:
        content = steps.item_to_json(item).encode()
        return self._store(store, event.origin, plan, content, now)

    def _store(
        self, store: Store, origin: MessageOrigin, plan: Plan, content: bytes, now: dt.datetime
    ) -> bool:
        _, _, duplicate = store.record_message(
            origin,
            f"worklist {origin.sending_application}",
            content,
            b"",
            plan.outcome,
            plan.jobs,
            now,
            plan.actions,
        )
        return duplicate
