"""Sub-operation counts and final statuses of a federated C-MOVE or C-GET, with fake peers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from twisted.internet import defer

from engine.dimse.status import Status
from engine.federation.fanout import FindSummary
from engine.federation.locations import Location
from engine.federation.qrscp import UNABLE_TO_PROCESS, _find_final
from engine.federation.retrieve import NOT_FOUND, Instance, RetrievePlan, WorkItem
from engine.federation.transfer import Counts, Sender, Transfer
from engine.model import PatientIdentifier

LOCATION = Location(
    "hospital_a", PatientIdentifier("HA-1", "HOSP_A"), PatientIdentifier("L1", "LOCAL")
)


class InlineReactor:
    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        function(*args)


class FakeServiceClass:
    """Reports a C-CANCEL after `cancel_after` checks, like pynetdicom's is_cancelled."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.cancel_after = cancel_after
        self.checks = 0

    def is_cancelled(self, message_id: int) -> bool:
        self.checks += 1
        return self.cancel_after is not None and self.checks > self.cancel_after


class FakeRetrieve:
    """Pulls by writing the spooled files the test names, or fails."""

    def __init__(self, spool: Path, arrived: dict[str, list[str]], failing: set[str]) -> None:
        self.spool = spool
        self.arrived = arrived
        self.failing = failing
        self.cancelled = False
        self.cleaned = False
        # Why each study's objects must not be sent on (an identifier moved), by study UID.
        self.stops: dict[str, str] = {}
        self.sent_studies: list[str] = []

    def stopped(self, study_instance_uid: str) -> str:
        return self.stops.get(study_instance_uid, "")

    def sent(self, study_instance_uid: str) -> None:
        self.sent_studies.append(study_instance_uid)

    def pull(self, item: WorkItem) -> defer.Deferred[Path]:
        if item.study_instance_uid in self.failing:
            return defer.fail(ConnectionRefusedError("site down"))
        folder = self.spool / item.study_instance_uid
        folder.mkdir(parents=True)
        for uid in self.arrived.get(item.study_instance_uid, []):
            (folder / f"{uid}.dcm").write_bytes(b"")
        return defer.succeed(folder)

    def cancel(self) -> None:
        self.cancelled = True

    def clean_up(self) -> None:
        self.cleaned = True


class FakeSender(Sender):
    def __init__(self, statuses: dict[str, int | None]) -> None:
        self.statuses = statuses
        self.sent: list[str] = []

    def send(self, path: Path) -> int | None:
        self.sent.append(path.stem)
        return self.statuses.get(path.stem, Status.SUCCESS)


class FakeResponder:
    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []

    def send(
        self,
        status: int,
        counts: Counts | None = None,
        remaining: int | None = None,
        failed_instances: list[str] | None = None,
        comment: str = "",
    ) -> None:
        self.responses.append(
            {
                "status": status,
                "completed": counts.completed if counts else None,
                "failed": counts.failed if counts else None,
                "warning": counts.warning if counts else None,
                "remaining": remaining,
                "failed_instances": list(failed_instances)
                if failed_instances is not None
                else None,
                "comment": comment,
            }
        )


def item(study: str, *uids: str) -> WorkItem:
    return WorkItem(
        LOCATION,
        study,
        Dataset(),
        tuple(Instance(uid, "1.2.840.10008.5.1.4.1.1.2") for uid in uids),
    )


def transfer(
    tmp_path: Path,
    plan: RetrievePlan,
    arrived: dict[str, list[str]],
    statuses: dict[str, int | None] | None = None,
    failing: set[str] | None = None,
    cancel_after: int | None = None,
    reports: list[tuple[str, int, int]] | None = None,
    stops: dict[str, str] | None = None,
    sender: FakeSender | None = None,
) -> tuple[FakeResponder, FakeRetrieve]:
    """Run a transfer; reports collects (study, sent, failed) for each study sent on."""
    responder = FakeResponder()
    retrieve = FakeRetrieve(tmp_path, arrived, failing or set())
    retrieve.stops = stops or {}
    request = Dataset()
    request.MessageID = 7
    Transfer(
        InlineReactor(),
        FakeServiceClass(cancel_after),  # type: ignore[arg-type]
        request,
        retrieve,  # type: ignore[arg-type]
        plan,
        sender or FakeSender(statuses or {}),
        responder,  # type: ignore[arg-type]
        "test#7",
        on_study_sent=lambda done, sent, failed: (reports if reports is not None else []).append(
            (done.study_instance_uid, sent, failed)
        ),
    ).run()
    return responder, retrieve


def test_transfer_success_with_pending_counts(tmp_path: Path) -> None:
    plan = RetrievePlan([item("1.1", "1.1.1", "1.1.2", "1.1.3")])
    reports: list[tuple[str, int, int]] = []
    responder, retrieve = transfer(
        tmp_path, plan, {"1.1": ["1.1.1", "1.1.2", "1.1.3"]}, reports=reports
    )
    assert reports == [("1.1", 3, 0)]
    *pending, final = responder.responses
    assert [r["status"] for r in pending] == [Status.PENDING, Status.PENDING]
    assert [(r["remaining"], r["completed"]) for r in pending] == [(2, 1), (1, 2)]
    assert final["status"] == Status.SUCCESS
    assert (final["completed"], final["failed"], final["remaining"]) == (3, 0, None)
    assert retrieve.cleaned


def test_transfer_missing_and_refused_give_b000(tmp_path: Path) -> None:
    plan = RetrievePlan([item("1.1", "1.1.1", "1.1.2", "1.1.3")])
    reports: list[tuple[str, int, int]] = []
    responder, _ = transfer(
        tmp_path,
        plan,
        {"1.1": ["1.1.1", "1.1.2"]},
        statuses={"1.1.2": Status.OUT_OF_RESOURCES},
        reports=reports,
    )
    # One sent, one refused by the destination, one that never arrived.
    assert reports == [("1.1", 1, 2)]
    final = responder.responses[-1]
    assert final["status"] == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert (final["completed"], final["failed"]) == (1, 2)
    assert sorted(final["failed_instances"]) == ["1.1.2", "1.1.3"]


def test_transfer_warning_counted(tmp_path: Path) -> None:
    plan = RetrievePlan([item("1.1", "1.1.1", "1.1.2")])
    responder, _ = transfer(tmp_path, plan, {"1.1": ["1.1.1", "1.1.2"]}, statuses={"1.1.1": 0xB007})
    final = responder.responses[-1]
    assert final["status"] == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert (final["completed"], final["warning"], final["failed"]) == (1, 1, 0)
    assert final["failed_instances"] == []


def test_transfer_all_failed_gives_a702(tmp_path: Path) -> None:
    plan = RetrievePlan([item("1.1", "1.1.1", "1.1.2")])
    reports: list[tuple[str, int, int]] = []
    responder, _ = transfer(tmp_path, plan, {}, failing={"1.1"}, reports=reports)
    # Nothing arrived, so nothing was sent on.
    assert reports == []
    final = responder.responses[-1]
    assert final["status"] == Status.OUT_OF_RESOURCES_SUB_OPERATIONS
    assert (final["completed"], final["failed"]) == (0, 2)
    assert final["failed_instances"] == ["1.1.1", "1.1.2"]


def test_transfer_nothing_found_is_success(tmp_path: Path) -> None:
    plan = RetrievePlan([], unavailable={"1.9": NOT_FOUND})
    responder, _ = transfer(tmp_path, plan, {})
    assert [r["status"] for r in responder.responses] == [Status.SUCCESS]
    assert responder.responses[0]["completed"] == 0


def test_transfer_site_unreachable_gives_a702(tmp_path: Path) -> None:
    plan = RetrievePlan([], unavailable={"1.9": "hospital_a: connection refused"})
    responder, _ = transfer(tmp_path, plan, {})
    final = responder.responses[-1]
    assert final["status"] == Status.OUT_OF_RESOURCES_SUB_OPERATIONS
    assert final["comment"] == "unavailable: 1.9"


def test_transfer_extra_instance_counted(tmp_path: Path) -> None:
    plan = RetrievePlan([item("1.1", "1.1.1")])
    responder, _ = transfer(tmp_path, plan, {"1.1": ["1.1.1", "1.1.9"]})
    final = responder.responses[-1]
    assert final["status"] == Status.SUCCESS
    assert final["completed"] == 2


def test_transfer_cancel_between_sub_operations(tmp_path: Path) -> None:
    plan = RetrievePlan([item("1.1", "1.1.1", "1.1.2", "1.1.3", "1.1.4")])
    reports: list[tuple[str, int, int]] = []
    responder, retrieve = transfer(
        tmp_path,
        plan,
        {"1.1": ["1.1.1", "1.1.2", "1.1.3", "1.1.4"]},
        cancel_after=3,
        reports=reports,
    )
    assert reports == [("1.1", 2, 0)]
    final = responder.responses[-1]
    assert final["status"] == Status.CANCEL
    assert final["completed"] == 2
    assert final["remaining"] == 2
    assert final["failed_instances"] == []
    assert retrieve.cancelled


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        (FindSummary(asked=["a"], answered=["a"]), None),
        (
            FindSummary(asked=["a", "b"], answered=["a"], failed={"b": "timed out after 5 s"}),
            (Status.SUCCESS, "no answer from b (timed out after 5 s)"),
        ),
        (
            FindSummary(asked=["b"], failed={"b": "failed: association rejected"}),
            (UNABLE_TO_PROCESS, "no answer from b (failed)"),
        ),
    ],
)
def test_find_final_status(summary: FindSummary, expected: tuple[int, str] | None) -> None:
    final = _find_final(summary)
    if expected is None:
        assert final is None
        return
    assert final is not None
    assert (final.Status, final.ErrorComment) == expected


def test_find_summary_comment_fits_lo() -> None:
    summary = FindSummary(failed={f"site_{i}": "timed out after 20 s" for i in range(5)})
    assert len(summary.failure_comment()) <= 64


def test_transfer_stopped_study_not_sent(tmp_path: Path) -> None:
    # An ADT message moved the site's identifier to another local patient after the pull.
    plan = RetrievePlan([item("1.1", "1.1.1", "1.1.2"), item("1.2", "1.2.1")])
    sender = FakeSender({})
    reports: list[tuple[str, int, int]] = []
    responder, retrieve = transfer(
        tmp_path,
        plan,
        {"1.1": ["1.1.1", "1.1.2"], "1.2": ["1.2.1"]},
        reports=reports,
        stops={"1.1": "identifier HA-1^^^HOSP_A was moved to patient L2^^^LOCAL"},
        sender=sender,
    )
    assert sender.sent == ["1.2.1"]
    assert reports == [("1.1", 0, 2), ("1.2", 1, 0)]
    final = responder.responses[-1]
    assert (final["completed"], final["failed"]) == (1, 2)
    assert retrieve.sent_studies == ["1.1", "1.2"]
