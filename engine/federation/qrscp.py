"""The pynetdicom side of the federated Q/R SCP: C-FIND, C-MOVE and C-GET on the engine's AE.

The handlers run in pynetdicom's association threads. They reach the reactor
only through blockingCallFromThread and callFromThread, and receive the rows
of a federated C-FIND through a queue, so the caller sees each row as soon as
a site returns it.

C-FIND uses pynetdicom's handler protocol. C-MOVE and C-GET are served by
this module's own service class, because the protocol of pynetdicom 3
associates with the move destination before the handler can return 0xA900
or 0x0124, and sends only datasets held in memory. Here the request is
checked first, and engine.federation.transfer sends the objects from the
spool as files, with counts that include the instances a site failed to
deliver.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import uid_to_service_class
from twisted.internet.threads import blockingCallFromThread

from engine.audit import Auditor, Node, Outcome
from engine.dimse.scu import AssociationTracker, NodeAddress, NodeClient
from engine.dimse.status import Status
from engine.dimse.transport import NoDelayAE
from engine.federation.fanout import Done, FederatedFind, Federation, FindEvent, FindSummary
from engine.federation.levels import FIND_MODELS, GET_MODELS, MOVE_MODELS
from engine.federation.request import IdentifierError, read_find, read_retrieve
from engine.federation.retrieve import (
    FederatedRetrieve,
    Retrieval,
    RetrievePlan,
    WorkItem,
)
from engine.federation.settings import FederationSettings
from engine.federation.transfer import GetSender, MoveSender, Responder, Sender, Transfer

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
        audit: Auditor | None = None,
        site_nodes: dict[str, Node] | None = None,
    ) -> None:
        self.reactor = reactor
        # With no auditor given, one without sinks: no records.
        self.audit = audit or Auditor(federation.ae_title)
        # Each site's AE title and host, as the audit records name them.
        self.site_nodes = site_nodes or {}
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
        """Serve a C-FIND, then record it in the audit trail with its final status."""
        final: int | Dataset | None = None
        completed = False
        # The fan-out's whole failure text, because the Error Comment sent is cut to 64
        # characters.
        summary: list[str] = []
        try:
            for status, answer in self._find(event, summary):
                final = status
                yield status, answer
            completed = True
        finally:
            self._audit_query(event, final, completed, summary)

    def _refused(
        self, association: Association, service: str, context: PresentationContext, reason: str
    ) -> None:
        caller = Node(self._caller(association), str(association.requestor.address))
        self.audit.restricted_use(caller, service, str(context.abstract_syntax), reason)

    def _audit_query(
        self, event: Any, final: int | Dataset | None, completed: bool, summary: list[str]
    ) -> None:
        if not self.audit.enabled:
            return
        code = final.Status if isinstance(final, Dataset) else final
        comment = str(final.get("ErrorComment", "")) if isinstance(final, Dataset) else ""
        if summary and comment:
            comment = summary[0]
        if code is None or code == Status.PENDING:
            # After the last match, pynetdicom sends the final success itself, unless
            # the association ended first. After a final status it stops asking.
            if completed:
                outcome = Outcome.SUCCESS
            else:
                outcome, comment = Outcome.MINOR_FAILURE, "ended before its final response"
        elif code == Status.SUCCESS:
            # A comment with success names the sites that sent no response.
            outcome = Outcome.MINOR_FAILURE if comment else Outcome.SUCCESS
        elif code == Status.CANCEL:
            outcome, comment = Outcome.MINOR_FAILURE, "cancelled by the caller"
        else:
            outcome = Outcome.SERIOUS_FAILURE
            comment = f"status 0x{int(code):04X}" + (f": {comment}" if comment else "")
        identifier = event.request.Identifier
        self.audit.query_answered(
            Node(self._caller(event.assoc), str(event.assoc.requestor.address)),
            str(event.context.abstract_syntax),
            identifier.getvalue() if identifier is not None else b"",
            str(event.context.transfer_syntax),
            outcome,
            comment,
        )

    def _find(
        self, event: Any, summary: list[str]
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        caller = self._caller(event.assoc)
        query_id = f"{caller}#{event.request.MessageID}"
        if caller not in self.settings.callers:
            logger.warning("C-FIND from %s rejected: calling AE title is not a caller", caller)
            self._refused(event.assoc, "C-FIND", event.context, f"AE title {caller} is not allowed")
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
        yield from self._stream(event, find, events, query_id, summary)

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
        summary: list[str],
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
                summary.append(item.summary.failure_text())
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
        responder = Responder(association, request, context, is_move)
        caller = self._caller(association)
        request_id = f"{caller}#{request.MessageID}"
        kind = "C-MOVE" if is_move else "C-GET"

        if caller not in self.settings.callers:
            logger.warning("%s from %s rejected: calling AE title is not a caller", kind, caller)
            self._refused(association, kind, context, f"AE title {caller} is not allowed")
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

        sender: Sender
        requestor = Node(caller, str(association.requestor.address))
        destination_node = requestor
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
                self._refused(
                    association, kind, context, f"move destination {destination} is not allowed"
                )
                responder.final(
                    Status.MOVE_DESTINATION_UNKNOWN, f"unknown destination {destination}"
                )
                return
            destination_node = Node(destination, address.host)
            node = NodeAddress(
                f"destination {destination}",
                destination,
                address.host,
                address.port,
                address.timeout_seconds,
            )
            sender = MoveSender(
                NodeClient(node, self.federation.ae_title, self.tracker, self.max_pdu_bytes),
                caller,
                request.MessageID,
            )
        else:
            sender = GetSender(association, request.MessageID)

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

        def study_sent(item: WorkItem, sent: int, failed: int) -> None:
            self._audit_study_sent(item, sent, failed, requestor, destination_node)

        Transfer(
            self.reactor,
            service,
            request,
            retrieve,
            plan,
            sender,
            responder,
            request_id,
            on_study_sent=study_sent,
        ).run()

    def _audit_study_sent(
        self, item: WorkItem, sent: int, failed: int, requestor: Node, destination: Node
    ) -> None:
        site = item.location.site
        if not failed:
            outcome, description = Outcome.SUCCESS, ""
        else:
            outcome = Outcome.MINOR_FAILURE if sent else Outcome.SERIOUS_FAILURE
            description = f"{failed} of {sent + failed} instances not stored"
        self.audit.study_transferred(
            item.location.local,
            item.study_instance_uid,
            self.site_nodes.get(site, Node(site, "")),
            destination,
            outcome,
            description,
            requestor=requestor,
        )


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
