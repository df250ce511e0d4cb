"""HL7 intake: parse, plan the work, store durably, then acknowledge.

The ACK is returned only after the message and the jobs it creates are
committed to the store. A message that cannot be accepted gets AR or AE (CR or
CE in enhanced mode) with an ERR segment. It is not stored, so the sender
keeps it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

from engine.hl7.ack import AckError, AckHeader, acknowledgements, split_acks, verdict_of
from engine.hl7.codes import AckCode, ErrorCode, Verdict
from engine.hl7.events import (
    IdentifierPolicy,
    Unhandled,
    check_control_id,
    check_environment,
    check_supported,
    is_acknowledgement,
    origin_of,
    to_events,
)
from engine.hl7.message import CharsetDefaults, HL7Error, Message, parse, same_message
from engine.jobs.planner import PatientChange, Plan
from engine.jobs.store import AsyncStore, ControlIdReused, MessageWrite, Recorded
from engine.model import DomainEvent, MessageOrigin
from engine.rules.model import RuleSet

logger = logging.getLogger(__name__)


Planner = Callable[[DomainEvent | Unhandled], Plan]
# Called after a message that changes patient records is stored: its origin, peer and changes.
PatientRecordHook = Callable[[MessageOrigin, str, Sequence[PatientChange]], None]
# Returns why a message is accepted and ignored, or None when it is processed.
IgnoreCheck = Callable[[MessageOrigin], str | None]


def ignore_reason(rule_set: RuleSet, origin: MessageOrigin) -> str | None:
    """Return why a message is accepted and ignored (the matching entry), or None."""
    for entry in rule_set.accept_and_ignore:
        match = entry.spec
        if origin.message_type not in match.message_type:
            continue
        if match.sending_application and (
            origin.sending_application not in match.sending_application
        ):
            continue
        if match.sending_facility and origin.sending_facility not in match.sending_facility:
            continue
        return f"accepted and ignored ({entry.where})"
    return None


@dataclasses.dataclass(frozen=True)
class Interpreter:
    """The step from message bytes to a plan, shared by intake and `fdqr messages replay`."""

    planner: Planner
    policy: IdentifierPolicy
    charsets: CharsetDefaults = dataclasses.field(default_factory=CharsetDefaults)
    ignored: IgnoreCheck = lambda origin: None
    # MSH-11 values accepted (HL7 Table 0103); others get AR 202.
    processing_ids: tuple[str, ...] = ("P",)

    def parse(self, content: bytes) -> Message:
        return parse(content, self.charsets)

    def plan(self, message: Message) -> Plan:
        """Plan what a message makes the engine do. Raises HL7Error if it cannot be accepted."""
        check_control_id(message)
        check_environment(message, self.processing_ids)
        reason = self.ignored(origin_of(message))
        if reason is not None:
            return Plan((), reason)
        check_supported(message)
        plans = [self.planner(event) for event in to_events(message, self.policy)]
        if len(plans) == 1:
            return plans[0]
        return Plan(
            jobs=[job for plan in plans for job in plan.jobs],
            outcome="; ".join(plan.outcome for plan in plans),
            actions=[action for plan in plans for action in plan.actions],
            patient_changes=[change for plan in plans for change in plan.patient_changes],
        )


class Intake:
    """The MessageHandler behind the MLLP listener."""

    def __init__(
        self,
        db: AsyncStore,
        planner: Planner,
        policy: IdentifierPolicy,
        charsets: CharsetDefaults | str = "UNICODE UTF-8",
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        on_jobs_created: Callable[[], None] = lambda: None,
        ignored: IgnoreCheck = lambda origin: None,
        on_answered: Callable[[Sequence[bytes]], None] = lambda acks: None,
        on_duplicate: Callable[[], None] = lambda: None,
        on_patient_records: PatientRecordHook = lambda origin, peer, changes: None,
        processing_ids: Sequence[str] = ("P",),
    ) -> None:
        self.db = db
        if isinstance(charsets, str):
            charsets = CharsetDefaults(charsets)
        self.interpreter = Interpreter(planner, policy, charsets, ignored, tuple(processing_ids))
        self.now = now
        self.on_jobs_created = on_jobs_created
        # Metrics hooks: the acknowledgements sent for each message, and each duplicate.
        self.on_answered = on_answered
        self.on_duplicate = on_duplicate
        # Audit hook: the patient records a stored message changed.
        self.on_patient_records = on_patient_records

    def handle_message(self, content: bytes, peer: str) -> defer.Deferred[Sequence[bytes]]:
        answered = self._answer(content, peer)
        answered.addCallback(self._counted)
        return answered

    def _counted(self, acks: Sequence[bytes]) -> Sequence[bytes]:
        self.on_answered(acks)
        return acks

    def _answer(self, content: bytes, peer: str) -> defer.Deferred[Sequence[bytes]]:
        try:
            message = self.interpreter.parse(content)
        except HL7Error as error:
            header = AckHeader.from_raw(content)
            logger.warning(
                "rejected unparsable message %s from %s: %s",
                header.control_id or "(no MSH-10)",
                peer,
                error.log_text,
            )
            return defer.succeed(self._error_acks(header, error))

        header = AckHeader.from_message(message)
        invalid_mode = header.invalid_ack_type()
        if invalid_mode is not None:
            logger.warning(
                "rejected message %s from %s: %s", header.control_id, peer, invalid_mode.log_text
            )
            return defer.succeed(self._error_acks(header.original_mode(), invalid_mode))
        if is_acknowledgement(message):
            # An ACK (e.g. the sender's commit acknowledgement of our application
            # acknowledgement) gets no ACK back, or two engines would loop.
            logger.info(
                "received %s %s from %s: acknowledgements get no ACK",
                message.message_type,
                header.control_id,
                peer,
            )
            return defer.succeed([])

        try:
            plan = self.interpreter.plan(message)
        except HL7Error as error:
            logger.warning(
                "rejected message %s from %s: %s",
                message.control_id or "(no MSH-10)",
                peer,
                error.log_text,
            )
            return defer.succeed(self._error_acks(header, error))

        return self._store(message, header, content, peer, plan)

    def _store(
        self, message: Message, header: AckHeader, content: bytes, peer: str, plan: Plan
    ) -> defer.Deferred[Sequence[bytes]]:
        origin = origin_of(message)
        answers = acknowledgements(header, Verdict.ACCEPT)
        write = MessageWrite(
            origin,
            peer,
            content,
            b"".join(answers),
            plan.outcome,
            plan.jobs,
            self.now(),
            plan.actions,
            same_message,
        )
        stored = self.db.record_message(write)

        def committed(result: Recorded) -> Sequence[bytes]:
            message_id, stored_answers, duplicate = result
            if duplicate:
                self.on_duplicate()
                logger.info(
                    "duplicate message %s from %s/%s at %s (stored as %d): sent the stored ACK",
                    origin.control_id,
                    origin.sending_application,
                    origin.sending_facility,
                    peer,
                    message_id,
                )
                return split_acks(stored_answers)
            logger.info(
                "stored %s %s from %s/%s at %s as message %d: %s",
                origin.message_type,
                origin.control_id,
                origin.sending_application,
                origin.sending_facility,
                peer,
                message_id,
                plan.outcome,
            )
            if plan.jobs:
                self.on_jobs_created()
            if plan.patient_changes:
                self.on_patient_records(origin, peer, plan.patient_changes)
            return answers

        def failed(failure: Failure) -> Sequence[bytes]:
            if isinstance(failure.value, ControlIdReused):
                return self._reused_control_id(header, failure.value, peer)
            logger.error(
                "storing message %s in %s failed: %s",
                origin.control_id,
                self.db.store.path,
                failure.getErrorMessage(),
            )
            error = HL7Error(
                "message could not be stored; send it again",
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                ("", 0, 0),
                AckCode.APPLICATION_ERROR,
            )
            return self._error_acks(header, error)

        return stored.addCallbacks(committed, failed)

    def _reused_control_id(
        self, header: AckHeader, reused: ControlIdReused, peer: str
    ) -> Sequence[bytes]:
        logger.warning(
            "rejected message %s from %s: its control id is already used by stored message %d"
            " with different content",
            reused.control_id,
            peer,
            reused.message_id,
        )
        error = HL7Error(
            f"MSH-10 '{reused.control_id}' is already used by another message from this sender;"
            " send this message with a new control id",
            ErrorCode.DUPLICATE_KEY_IDENTIFIER,
            ("MSH", 1, 10),
            AckCode.APPLICATION_ERROR,
        )
        return self._error_acks(header, error)

    def reject_oversize(
        self, head: bytes, size: int, peer: str, limit: int | None = None
    ) -> Sequence[bytes]:
        header = AckHeader.from_raw(head)
        if not header.control_id:
            self.on_answered([])
            return []
        error = HL7Error(
            f"message of {size} bytes or more exceeds the size limit"
            + (f" of {limit} bytes (mllp.max_message_bytes)" if limit is not None else ""),
            ErrorCode.APPLICATION_INTERNAL_ERROR,
            ("", 0, 0),
            AckCode.APPLICATION_REJECT,
        )
        return self._counted(self._error_acks(header, error))

    def _error_acks(self, header: AckHeader, error: HL7Error) -> list[bytes]:
        return acknowledgements(header, verdict_of(error), [AckError.from_error(error)])
