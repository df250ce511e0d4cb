"""The pynetdicom side of the federated Q/R SCP: C-FIND, C-MOVE and C-GET on the engine's AE.

The handlers run in pynetdicom's association threads. They reach the reactor
only through blockingCallFromThread and callFromThread, and receive the rows
of a federated C-FIND through a queue, so the caller sees each row as soon as
a site returns it.

C-FIND uses pynetdicom's handler protocol. C-MOVE and C-GET are served by
this module's own service class, because the protocol of pynetdicom 3
associates with the move destination before the handler can return 0xA900
or 0x0124, and sends only datasets held in memory. Here every final status is
chosen as PS3.4 C.4.2 and C.4.3 say, the counts include the instances a site
failed to deliver, and objects go from the spool to the destination as files.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom.association
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import uid_to_service_class
from twisted.internet.threads import blockingCallFromThread
from twisted.python.failure import Failure

from engine.dimse.scu import MAX_CONTEXTS, AssociationTracker, DimseError, NodeAddress, NodeClient
from engine.dimse.status import Status, is_success_or_warning
from engine.dimse.transport import NoDelayAE
from engine.federation.fanout import Done, FederatedFind, Federation, FindEvent, FindSummary
from engine.federation.levels import FIND_MODELS, GET_MODELS, MOVE_MODELS
from engine.federation.request import IdentifierError, read_find, read_retrieve
from engine.federation.retrieve import (
    NOT_FOUND,
    FederatedRetrieve,
    Retrieval,
    RetrievePlan,
    WorkItem,
)
from engine.federation.settings import FederationSettings

logger = logging.getLogger(__name__)

# Failure (PS3.4 C.4.1.1.4, Cxxx): every site asked for a C-FIND failed.
UNABLE_TO_PROCESS = 0xC001
POLL_SECONDS = 0.1
# Extra time a C-FIND handler waits beyond the slowest site's timeout.
FIND_GRACE_SECONDS = 30.0
_SERVICE_ATTRIBUTE = "fdqr_federated_qr"


class QRService:
    """The federated Q/R SCP, added to the engine's AE next to the Storage SCP."""

    def __init__(
        self,
        reactor: Any,
        federation: Federation,
        retrieval: Retrieval,
        settings: FederationSettings,
        tracker: AssociationTracker,
        max_pdu_bytes: int,
    ) -> None:
        self.reactor = reactor
        self.federation = federation
        self.retrieval = retrieval
        self.settings = settings
        self.tracker = tracker
        self.max_pdu_bytes = max_pdu_bytes
        self.find_timeout = max(
            (site.timeout_seconds for site in federation.sites.values()), default=0.0
        )

    def configure(self, ae: NoDelayAE) -> None:
        """Add the Q/R presentation contexts, and accept the SCP role for C-GET's C-STOREs."""
        install_service_class()
        for sop_class in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
            ae.add_supported_context(sop_class)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(
                context.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        setattr(ae, _SERVICE_ATTRIBUTE, self)

    @property
    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_C_FIND, self.on_find)]

    def _caller(self, association: Association) -> str:
        return str(association.requestor.ae_title).strip()

    # C-FIND

    def on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        caller = self._caller(event.assoc)
        query_id = f"{caller}#{event.request.MessageID}"
        if caller not in self.settings.callers:
            logger.warning("C-FIND from %s rejected: calling AE title is not a caller", caller)
            yield _status(Status.REFUSED_NOT_AUTHORIZED, f"AE title {caller} is not allowed"), None
            return
        model = FIND_MODELS[str(event.context.abstract_syntax)]
        try:
            request = read_find(model, event.identifier, self.federation.local_issuer)
        except IdentifierError as error:
            logger.warning("C-FIND %s rejected: %s", query_id, error)
            yield _status(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(error)), None
            return
        except Exception as error:
            logger.warning("C-FIND %s rejected: identifier cannot be read: %s", query_id, error)
            yield _status(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unreadable identifier"), None
            return

        character_set = (
            request.character_set
            or self.settings.callers[caller].character_set
            or self.settings.character_set
        )
        events: queue.Queue[FindEvent] = queue.Queue()
        logger.info(
            "C-FIND %s: %s level %s, patient %s",
            query_id,
            model.value,
            request.level.name,
            request.patient or "not given",
        )
        find = blockingCallFromThread(
            self.reactor, self._start_find, request, character_set, events.put, query_id
        )
        yield from self._stream(event, find, events, query_id)

    def _start_find(
        self, request: Any, character_set: str, sink: Any, query_id: str
    ) -> FederatedFind:
        find = FederatedFind(self.federation, request, character_set, sink, query_id)
        find.start()
        return find

    def _stream(
        self,
        event: Any,
        find: FederatedFind,
        events: queue.Queue[FindEvent],
        query_id: str,
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        deadline = time.monotonic() + self.find_timeout + FIND_GRACE_SECONDS
        while True:
            try:
                item = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if event.is_cancelled:
                    self.reactor.callFromThread(find.cancel)
                    yield Status.CANCEL, None
                    return
                if time.monotonic() > deadline:
                    logger.error("C-FIND %s: no final response from the fan-out in time", query_id)
                    self.reactor.callFromThread(find.cancel)
                    yield _status(UNABLE_TO_PROCESS, "federated query timed out"), None
                    return
                continue
            if isinstance(item, Done):
                final = _find_final(item.summary)
                if final is not None:
                    yield final, None
                return
            yield Status.PENDING, item.dataset
            if event.is_cancelled:
                self.reactor.callFromThread(find.cancel)
                yield Status.CANCEL, None
                return

    # C-MOVE and C-GET

    def serve_retrieve(
        self, service: QueryRetrieveServiceClass, request: Any, context: PresentationContext
    ) -> None:
        association = service.assoc
        is_move = isinstance(request, C_MOVE)
        responder = _Responder(association, request, context, is_move)
        caller = self._caller(association)
        request_id = f"{caller}#{request.MessageID}"
        kind = "C-MOVE" if is_move else "C-GET"

        if caller not in self.settings.callers:
            logger.warning("%s from %s rejected: calling AE title is not a caller", kind, caller)
            responder.final(Status.REFUSED_NOT_AUTHORIZED, f"AE title {caller} is not allowed")
            return
        models = MOVE_MODELS if is_move else GET_MODELS
        model = models[str(context.abstract_syntax)]
        try:
            syntax = context.transfer_syntax[0]
            identifier = decode(
                request.Identifier,
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                syntax.is_deflated,
            )
            retrieve_request = read_retrieve(model, identifier, self.federation.local_issuer)
        except IdentifierError as error:
            logger.warning("%s %s rejected: %s", kind, request_id, error)
            responder.final(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(error))
            return
        except Exception as error:
            logger.warning("%s %s rejected: identifier cannot be read: %s", kind, request_id, error)
            responder.final(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unreadable identifier")
            return

        sender: _Sender
        if is_move:
            destination = str(request.MoveDestination or "").strip()
            address = self.settings.move_destinations.get(destination)
            allowed = destination in self.settings.callers[caller].move_destinations
            if address is None or not allowed:
                logger.warning(
                    "C-MOVE %s rejected: destination %s is not allowed for %s",
                    request_id,
                    destination,
                    caller,
                )
                responder.final(
                    Status.MOVE_DESTINATION_UNKNOWN, f"unknown destination {destination}"
                )
                return
            node = NodeAddress(
                f"destination {destination}",
                destination,
                address.host,
                address.port,
                address.timeout_seconds,
            )
            sender = _MoveSender(
                NodeClient(node, self.federation.ae_title, self.tracker, self.max_pdu_bytes),
                caller,
                request.MessageID,
            )
        else:
            sender = _GetSender(association, request.MessageID)

        logger.info("%s %s: level %s", kind, request_id, retrieve_request.level.name)
        retrieve = FederatedRetrieve(self.retrieval, retrieve_request, request_id)
        try:
            plan: RetrievePlan = blockingCallFromThread(
                self.reactor,
                retrieve.plan,  # type: ignore[arg-type]
            )
        except Exception as error:
            logger.exception("%s %s: planning failed", kind, request_id)
            responder.final(UNABLE_TO_PROCESS, f"retrieve failed: {type(error).__name__}")
            return
        _Transfer(self, service, request, retrieve, plan, sender, responder, request_id).run()


class _Responder:
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
        counts: _Counts | None = None,
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


class _Counts:
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


class _Sender:
    problem = ""

    def open(self, files: list[Path]) -> None: ...

    def send(self, path: Path) -> int | None:
        raise NotImplementedError

    def close(self) -> None: ...


class _MoveSender(_Sender):
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


class _GetSender(_Sender):
    """Sends the C-STORE sub-operations of a C-GET back on the caller's association."""

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
            if str(syntax) in accepted:
                status = self.association.send_c_store(path, msg_id=message_id)
            elif accepted and not syntax.is_compressed:
                # pynetdicom re-encodes an uncompressed dataset in another
                # uncompressed transfer syntax the caller accepted.
                status = self.association.send_c_store(dcmread(path), msg_id=message_id)
            else:
                logger.warning(
                    "C-GET caller accepted no context for %s in %s", path.stem, syntax.name
                )
                return None
        except Exception as error:
            logger.warning("C-STORE of %s to the C-GET caller failed: %s", path.stem, error)
            return None
        return int(status.Status) if status is not None and "Status" in status else None


class _Transfer:
    """Pulls each planned study into the spool and sends it on, with counts and the final status."""

    def __init__(
        self,
        service: QRService,
        service_class: QueryRetrieveServiceClass,
        request: Any,
        retrieve: FederatedRetrieve,
        plan: RetrievePlan,
        sender: _Sender,
        responder: _Responder,
        request_id: str,
    ) -> None:
        self.service = service
        self.service_class = service_class
        self.request = request
        self.retrieve = retrieve
        self.plan = plan
        self.sender = sender
        self.responder = responder
        self.request_id = request_id
        self.counts = _Counts(plan.total)
        self.cancelled = False
        # The first problem with the move destination, for the final Error Comment.
        self.destination_problem = ""

    @property
    def reactor(self) -> Any:
        return self.service.reactor

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
            self.reactor.callFromThread(self.retrieve.clean_up)
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
        try:
            for path in files:
                if self._check_cancel():
                    return
                self.counts.record(self.sender.send(path), path.stem)
                self._pending()
        finally:
            self.sender.close()
        received = {path.stem for path in files}
        missing = [uid for uid in sorted(expected) if uid not in received]
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
        logger.info(
            "retrieve %s %s: %d completed, %d failed, %d warning",
            self.request_id,
            status_text,
            counts.completed,
            counts.failed,
            counts.warning,
        )

    def _unavailable_by_failure(self) -> bool:
        return any(reason != NOT_FOUND for reason in self.plan.unavailable.values())


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _find_final(summary: FindSummary) -> Dataset | None:
    """Return the final C-FIND status when plain success would hide a failed site."""
    comment = summary.failure_comment()
    if not comment:
        return None
    if summary.asked and not summary.answered:
        return _status(UNABLE_TO_PROCESS, comment)
    # Success with an Error Comment naming the sites that did not respond,
    # because the C-FIND service defines no final warning status (PS3.4 C.4.1.1.4).
    return _status(Status.SUCCESS, comment)


class _FederatedQueryRetrieveServiceClass(QueryRetrieveServiceClass):
    """Serves C-MOVE and C-GET itself on an AE with a QRService, elsewhere as pynetdicom does."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        service = getattr(self.ae, _SERVICE_ATTRIBUTE, None)
        if service is None:
            super()._move_scp(req, context)
            return
        service.serve_retrieve(self, req, context)

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        service = getattr(self.ae, _SERVICE_ATTRIBUTE, None)
        if service is None:
            super()._get_scp(req, context)
            return
        service.serve_retrieve(self, req, context)


_install_lock = threading.Lock()


def install_service_class() -> None:
    """Make associations use the federated service class for Q/R SOP classes.

    NOTE: pynetdicom 3 picks a service class by UID in Association._serve_request
    through the module-level uid_to_service_class, with no public hook; this
    wraps that function. The class behaves as pynetdicom's own on any AE
    without a QRService. Check it when pynetdicom is upgraded.
    """
    with _install_lock:
        current = pynetdicom.association.uid_to_service_class  # type: ignore[attr-defined]
        if getattr(current, "fdqr_wrapped", False):
            return

        def service_class_for(uid: str) -> Any:
            found = uid_to_service_class(uid)
            if found is QueryRetrieveServiceClass:
                return _FederatedQueryRetrieveServiceClass
            return found

        service_class_for.fdqr_wrapped = True  # type: ignore[attr-defined]
        pynetdicom.association.uid_to_service_class = service_class_for  # type: ignore[attr-defined]
