"""HL7 intake: parse, plan the work, store durably, then acknowledge.

The ACK is returned only after the message and the jobs it creates are
committed to the store. A message that cannot be accepted is answered with
AR or AE and an ERR segment; it is not stored, so the sender keeps it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from engine.hl7.ack import AckError, AckHeader, build_ack
from engine.hl7.codes import AckCode, ErrorCode
from engine.hl7.events import IdentifierPolicy, Unhandled, check_header, origin_of, to_event
from engine.hl7.message import HL7Error, Message, parse
from engine.jobs.planner import Plan
from engine.jobs.store import AsyncStore
from engine.model import DomainEvent

logger = logging.getLogger(__name__)


Planner = Callable[[DomainEvent | Unhandled], Plan]


class Intake:
    """The MessageHandler behind the MLLP listener."""

    def __init__(
        self,
        db: AsyncStore,
        planner: Planner,
        policy: IdentifierPolicy,
        default_charset: str = "utf-8",
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        on_jobs_created: Callable[[], None] = lambda: None,
    ) -> None:
        self.db = db
        self.planner = planner
        self.policy = policy
        self.default_charset = default_charset
        self.now = now
        self.on_jobs_created = on_jobs_created

    def handle_message(self, content: bytes, peer: str) -> defer.Deferred[bytes]:
        try:
            message = parse(content, self.default_charset)
        except HL7Error as error:
            logger.warning("rejected unparsable message from %s: %s", peer, error.text)
            return defer.succeed(self._error_ack(AckHeader.from_raw(content), error))

        header = AckHeader.from_message(message)
        try:
            check_header(message)
            event = to_event(message, self.policy)
            plan = self.planner(event)
        except HL7Error as error:
            logger.warning(
                "rejected message %s from %s: %s",
                message.control_id or "(no MSH-10)",
                peer,
                error.text,
            )
            return defer.succeed(self._error_ack(header, error))

        return self._store(message, header, content, peer, plan)

    def _store(
        self, message: Message, header: AckHeader, content: bytes, peer: str, plan: Plan
    ) -> defer.Deferred[bytes]:
        origin = origin_of(message)
        ack = build_ack(header, AckCode.APPLICATION_ACCEPT)
        now = self.now()
        stored = self.db.run(
            lambda store: store.record_message(
                origin, peer, content, ack, plan.outcome, plan.jobs, now, plan.actions
            )
        )

        def committed(result: tuple[int, bytes, bool]) -> bytes:
            message_id, stored_ack, duplicate = result
            if duplicate:
                logger.info(
                    "duplicate message %s from %s/%s (stored as %d): sent the stored ACK",
                    origin.control_id,
                    origin.sending_application,
                    origin.sending_facility,
                    message_id,
                )
                return stored_ack
            logger.info(
                "stored %s %s from %s as message %d: %s",
                origin.message_type,
                origin.control_id,
                peer,
                message_id,
                plan.outcome,
            )
            if plan.jobs:
                self.on_jobs_created()
            return stored_ack

        def failed(failure: Failure) -> bytes:
            logger.error(
                "storing message %s failed: %s", origin.control_id, failure.getErrorMessage()
            )
            error = HL7Error(
                "message could not be stored; send it again",
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                ("", 0, 0),
                AckCode.APPLICATION_ERROR,
            )
            return self._error_ack(header, error)

        return stored.addCallbacks(committed, failed)

    def reject_oversize(self, head: bytes, size: int, peer: str) -> bytes | None:
        header = AckHeader.from_raw(head)
        if not header.control_id:
            return None
        error = HL7Error(
            f"message of {size} bytes or more exceeds the size limit",
            ErrorCode.APPLICATION_INTERNAL_ERROR,
            ("", 0, 0),
            AckCode.APPLICATION_REJECT,
        )
        return self._error_ack(header, error)

    def _error_ack(self, header: AckHeader, error: HL7Error) -> bytes:
        return build_ack(header, error.ack, [AckError(error.code, error.text, error.location)])
