"""Sending the objects of a federated C-MOVE or C-GET, with counts and the final status.

Transfer runs in the caller's association thread. It has each planned study
pulled into the spool on the reactor, then sends the files to the move
destination (MoveSender) or back on the caller's association (GetSender),
with a pending response after each sub-operation. The final status is one
that PS3.4 C.4.2 and C.4.3 define: Success, 0xB000 with the Failed SOP
Instance UID List, 0xA702 when nothing could be sent, or Cancel. Instances a
site failed to deliver count as failed sub-operations.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass
from twisted.python.failure import Failure

from engine.dimse.forward import TRANSCODED_SUFFIX
from engine.dimse.scu import MAX_CONTEXTS, DimseError, NodeClient
from engine.dimse.status import Status, is_success_or_warning
from engine.dimse.transcode import TranscodeError, transcode
from engine.federation.retrieve import (
    NOT_FOUND,
    SEVERAL_PATIENTS,
    UNREACHABLE,
    FederatedRetrieve,
    RetrievePlan,
    WorkItem,
)

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1


class Responder:
    """Builds and sends C-MOVE or C-GET responses on the caller's association."""

    def __init__(
        self, association: Association, request: Any, context: PresentationContext, is_move: bool
    ) -> None:
        self.association = association
        self.request = request
        self.context = context
        self.is_move = is_move

    def send(
        self,
        status: int,
        counts: Counts | None = None,
        remaining: int | None = None,
        failed_instances: list[str] | None = None,
        comment: str = "",
    ) -> None:
        response = C_MOVE() if self.is_move else C_GET()
        response.MessageIDBeingRespondedTo = self.request.MessageID
        response.AffectedSOPClassUID = self.request.AffectedSOPClassUID
        response.Status = status
        if counts is not None:
            response.NumberOfCompletedSuboperations = counts.completed
            response.NumberOfFailedSuboperations = counts.failed
            response.NumberOfWarningSuboperations = counts.warning
        if remaining is not None:
            response.NumberOfRemainingSuboperations = remaining
        if comment:
            response.ErrorComment = comment[:64]  # type: ignore[assignment]
        if failed_instances is not None:
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = failed_instances
            syntax = self.context.transfer_syntax[0]
            encoded = encode(
                identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
            )
            response.Identifier = BytesIO(encoded or b"")
        assert self.context.context_id is not None
        self.association.dimse.send_msg(response, self.context.context_id)

    def final(self, status: int, comment: str = "") -> None:
        self.send(status, comment=comment)


class Counts:
    def __init__(self, total: int) -> None:
        self.total = total
        self.completed = 0
        self.failed = 0
        self.warning = 0
        self.failed_instances: list[str] = []

    @property
    def remaining(self) -> int:
        return max(self.total - self.completed - self.failed - self.warning, 0)

    def record(self, status: int | None, sop_instance_uid: str) -> None:
        if status == Status.SUCCESS:
            self.completed += 1
        elif status is not None and is_success_or_warning(status):
            self.warning += 1
        else:
            self.failed += 1
            self.failed_instances.append(sop_instance_uid)


class Sender:
    problem = ""

    def open(self, files: list[Path]) -> None: ...

    def send(self, path: Path) -> int | None:
        raise NotImplementedError

    def close(self) -> None: ...


class MoveSender(Sender):
    """Sends the C-STORE sub-operations of a C-MOVE on an association with the destination."""

    def __init__(self, client: NodeClient, originator: str, originator_message_id: int) -> None:
        self.client = client
        self.originator = originator
        self.originator_message_id = originator_message_id
        self._association: Association | None = None
        self._context_manager: Any = None
        self.problem = ""

    def open(self, files: list[Path]) -> None:
        self.problem = ""
        syntaxes: set[tuple[str, str]] = set()
        for path in files:
            try:
                meta = read_file_meta_info(path)
                syntaxes.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
            except Exception as error:
                logger.warning("spooled file %s unreadable: %s", path.name, error)
        contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in sorted(syntaxes)][
            :MAX_CONTEXTS
        ]
        if not contexts:
            return
        try:
            self._context_manager = self.client.associate(contexts)
            self._association = self._context_manager.__enter__()
        except DimseError as error:
            self.problem = f"destination not reachable: {error}"
            logger.warning("%s", self.problem)
            self._context_manager = None
            self._association = None

    def send(self, path: Path) -> int | None:
        association = self._association
        if association is None or not association.is_established:
            return None
        try:
            status = association.send_c_store(
                path,
                msg_id=self.client.next_message_id(),
                originator_aet=self.originator,
                originator_id=self.originator_message_id,
            )
        except (ValueError, AttributeError, RuntimeError) as error:
            logger.warning("C-STORE of %s to %s failed: %s", path.stem, self.client.node, error)
            return None
        return int(status.Status) if status is not None and "Status" in status else None

    def close(self) -> None:
        if self._context_manager is not None:
            self._context_manager.__exit__(None, None, None)
        self._context_manager = None
        self._association = None


class GetSender(Sender):
    """Sends the C-STORE sub-operations of a C-GET back on the caller's association.

    An object is sent in its stored transfer syntax when the caller accepted
    it. A compressed object is decompressed when the caller accepted only
    uncompressed syntaxes for its SOP class.
    """

    def __init__(self, association: Association, message_id: int) -> None:
        self.association = association
        self._message_ids = iter(range(message_id + 1, message_id + 1 + (1 << 20)))

    def send(self, path: Path) -> int | None:
        message_id = (next(self._message_ids) - 1) % 0xFFFF + 1
        try:
            meta = read_file_meta_info(path)
            accepted = {
                str(context.transfer_syntax[0])
                for context in self.association.accepted_contexts
                if context.abstract_syntax == meta.MediaStorageSOPClassUID and context.as_scu
            }
            syntax = meta.TransferSyntaxUID
            uncompressed = [uid for uid in UNCOMPRESSED_PREFERENCE if uid in accepted]
            if str(syntax) in accepted:
                status = self.association.send_c_store(path, msg_id=message_id)
            elif uncompressed and not syntax.is_compressed:
                # pynetdicom re-encodes an uncompressed dataset in another
                # uncompressed transfer syntax the caller accepted.
                status = self.association.send_c_store(dcmread(path), msg_id=message_id)
            elif uncompressed:
                status = self._send_decompressed(path, uncompressed[0], message_id)
            else:
                logger.warning(
                    "C-GET caller accepted no context for %s in %s", path.stem, syntax.name
                )
                return None
        except TranscodeError as error:
            logger.warning("C-STORE of %s to the C-GET caller failed: %s", path.stem, error)
            return None
        except Exception as error:
            logger.warning("C-STORE of %s to the C-GET caller failed: %s", path.stem, error)
            return None
        return int(status.Status) if status is not None and "Status" in status else None

    def _send_decompressed(self, path: Path, syntax: str, message_id: int) -> Any:
        target = path.with_name(path.name + TRANSCODED_SUFFIX)
        try:
            transcode(path, target, syntax)
            return self.association.send_c_store(target, msg_id=message_id)
        finally:
            target.unlink(missing_ok=True)


# Uncompressed transfer syntaxes a decompressed object is sent in, the first the caller accepted.
UNCOMPRESSED_PREFERENCE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)


# Called for each study sent on: the study's work item, and its instances sent and failed.
StudySent = Callable[[WorkItem, int, int], None]


class Transfer:
    """Pulls each planned study into the spool and sends it on, with counts and the final status."""

    def __init__(
        self,
        reactor: Any,
        service_class: QueryRetrieveServiceClass,
        request: Any,
        retrieve: FederatedRetrieve,
        plan: RetrievePlan,
        sender: Sender,
        responder: Responder,
        request_id: str,
        on_study_sent: StudySent = lambda item, sent, failed: None,
    ) -> None:
        self.reactor = reactor
        self.service_class = service_class
        self.request = request
        self.retrieve = retrieve
        self.plan = plan
        self.sender = sender
        self.responder = responder
        self.request_id = request_id
        self.on_study_sent = on_study_sent
        self.counts = Counts(plan.total)
        self.cancelled = False
        # The first problem with the move destination, for the final Error Comment.
        self.destination_problem = ""

    def run(self) -> None:
        try:
            for item in self.plan.items:
                if self._check_cancel():
                    break
                self._transfer(item)
                if self.cancelled:
                    break
        except Exception:
            # Whatever was not sent yet counts as failed, so the caller never waits for it.
            logger.exception("retrieve %s failed", self.request_id)
            self.counts.failed += self.counts.remaining
        finally:
            self.sender.close()
            # Here in the transfer's thread: deleting a large study must not block the reactor.
            self.retrieve.clean_up()
        self._final()

    def _check_cancel(self) -> bool:
        if not self.cancelled and self.service_class.is_cancelled(self.request.MessageID):
            self.cancelled = True
            self.reactor.callFromThread(self.retrieve.cancel)
        return self.cancelled

    def _transfer(self, item: WorkItem) -> None:
        spool = self._pull(item)
        if spool is None:
            if not self.cancelled:
                for instance in item.instances:
                    self.counts.record(None, instance.sop_instance_uid)
                self._pending()
            return
        files = sorted(spool.glob("*.dcm"))
        expected = {instance.sop_instance_uid for instance in item.instances}
        extra = [path for path in files if path.stem not in expected]
        self.counts.total += len(extra)
        self.sender.open(files)
        self.destination_problem = self.destination_problem or self.sender.problem
        sent = failed = 0
        try:
            for position, path in enumerate(files):
                if self._check_cancel():
                    break
                stopped = self.retrieve.stopped(item.study_instance_uid)
                if stopped:
                    failed += self._withhold(item, files[position:], stopped)
                    break
                status = self.sender.send(path)
                self.counts.record(status, path.stem)
                if status is not None and is_success_or_warning(status):
                    sent += 1
                else:
                    failed += 1
                self._pending()
        finally:
            self.sender.close()
            self.retrieve.sent(item.study_instance_uid)
        if self.cancelled:
            if sent or failed:
                self.on_study_sent(item, sent, failed)
            return
        received = {path.stem for path in files}
        missing = [uid for uid in sorted(expected) if uid not in received]
        if sent or failed:
            self.on_study_sent(item, sent, failed + len(missing))
        for uid in missing:
            self.counts.record(None, uid)
        if missing:
            logger.warning(
                "retrieve %s: %d instances of study %s did not arrive from %s",
                self.request_id,
                len(missing),
                item.study_instance_uid,
                item.location.site,
            )
            self._pending()

    def _withhold(self, item: WorkItem, files: list[Path], reason: str) -> int:
        """Count the study's objects not yet sent as failed; return how many they are."""
        logger.warning(
            "retrieve %s: %d objects of study %s not sent: %s",
            self.request_id,
            len(files),
            item.study_instance_uid,
            reason,
        )
        for path in files:
            self.counts.record(None, path.stem)
        self._pending()
        return len(files)

    def _pull(self, item: WorkItem) -> Path | None:
        """Run the site's C-MOVE to the engine; watch for C-CANCEL while it runs."""
        results: queue.Queue[Path | Failure] = queue.Queue()
        self.reactor.callFromThread(lambda: self.retrieve.pull(item).addBoth(results.put))
        while True:
            try:
                result = results.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if self._check_cancel():
                    return None
        if isinstance(result, Failure):
            logger.warning(
                "retrieve %s: C-MOVE of study %s from %s failed: %s",
                self.request_id,
                item.study_instance_uid,
                item.location.site,
                result.getErrorMessage(),
            )
            return None
        return result

    def _pending(self) -> None:
        if self.counts.remaining > 0:
            self.responder.send(Status.PENDING, self.counts, remaining=self.counts.remaining)

    def _final(self) -> None:
        counts = self.counts
        comment = ""
        if self.plan.unavailable:
            comment = "unavailable: " + ", ".join(sorted(self.plan.unavailable))
        unreachable = [r for r in self.plan.unavailable.values() if r.startswith(UNREACHABLE)]
        if unreachable:
            comment = unreachable[0][:64]
        if SEVERAL_PATIENTS in self.plan.unavailable.values():
            comment = "a study is held for several patients; add the PatientID"
        if self.destination_problem:
            comment = self.destination_problem
        if self.cancelled:
            self.responder.send(
                Status.CANCEL,
                counts,
                remaining=counts.remaining,
                failed_instances=counts.failed_instances,
            )
            status_text = "cancelled"
        elif counts.total == 0 and not self._unavailable_by_failure():
            self.responder.send(Status.SUCCESS, counts)
            status_text = "success, nothing to send"
        elif counts.completed == 0 and counts.warning == 0:
            self.responder.send(
                Status.OUT_OF_RESOURCES_SUB_OPERATIONS,
                counts,
                failed_instances=counts.failed_instances,
                comment=comment or "no sub-operation succeeded",
            )
            status_text = "failed"
        elif counts.failed or counts.warning or self._unavailable_by_failure():
            self.responder.send(
                Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES,
                counts,
                failed_instances=counts.failed_instances,
                comment=comment,
            )
            status_text = "complete with failures"
        else:
            self.responder.send(Status.SUCCESS, counts)
            status_text = "success"
        unsuccessful = status_text in ("failed", "complete with failures")
        logger.log(
            logging.WARNING if unsuccessful else logging.INFO,
            "retrieve %s %s: %d completed, %d failed, %d warning%s",
            self.request_id,
            status_text,
            counts.completed,
            counts.failed,
            counts.warning,
            f" ({comment})" if unsuccessful and comment else "",
        )

    def _unavailable_by_failure(self) -> bool:
        return any(reason != NOT_FOUND for reason in self.plan.unavailable.values())
