"""GatewayLink: the stream each gateway keeps open. Thin: it converts messages and hands
them to the reader pool; the stream's life is the gateway's presence.

Over mutual TLS a station's site and labels come from its certificate (enrolled, see
shared/pki.py), never from its hello; the link carries the orchestrator's CRL to the gateway
and ends as soon as the gateway's own certificate is revoked (docs/stations.md)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from orchestrator.services.pool import Command, GatewaySession, ReaderPool
from shared import cards, convert
from shared.errors import CardlineError, InvalidArgument, PermissionDenied, Unauthenticated, quoted
from shared.limits import check_message
from shared.logging import get_logger
from shared.pki import Enrollment, enrollment_of
from shared.proto import link_pb2, link_pb2_grpc
from shared.rpc import rpc_errors
from shared.tls import PeerIdentity, RevocationList, peer_certificate, peer_identity

log = get_logger(__name__)


def command_to_proto(c: Command) -> link_pb2.OrchestratorMessage:
    return link_pb2.OrchestratorMessage(command=link_pb2.Command(
        command_id=c.command_id, reader_id=c.reader_id, task_id=c.task_id, step_number=c.step_number,
        step=convert.step_to_proto(c.step)))


def enrolled_place(hello: link_pb2.GatewayHello, enrollment: Enrollment, peer: PeerIdentity) -> Enrollment:
    """ENROLLMENT, the place of the station whose certificate it is; a hello that names
    another site or other labels is refused (an empty site or no labels claims nothing)."""
    claimed_labels = dict(hello.labels)
    wrong = []
    if hello.site and hello.site != enrollment.site:
        wrong.append(f"site {quoted(hello.site, 64)}")
    if claimed_labels and claimed_labels != dict(enrollment.labels):
        pairs = ", ".join(f"{quoted(k, 32)}={quoted(v, 32)}" for k, v in sorted(claimed_labels.items())[:8])
        wrong.append(f"labels {{{pairs}{', ...' if len(claimed_labels) > 8 else ''}}}")
    if wrong:
        raise PermissionDenied(
            f"gateway {peer.name!r} claims {' and '.join(wrong)} in its hello but is enrolled with "
            f"{enrollment.describe()} (certificate serial {peer.serial:x}): a station does not choose where it "
            "stands; drop site/labels from its settings or enroll it again", gateway_id=peer.name)
    return enrollment


_HEARTBEAT = object()       # in a session's outbox: send a heartbeat (GatewayLinkServicer._watch_heartbeats)


@dataclass(eq=False)
class _Link:
    """One open link as the heartbeat watch sees it (monotonic seconds)."""
    session: GatewaySession
    reader: asyncio.Task | None = None
    last_sent: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    sequence: int = 0
    beat_queued: bool = False
    silent: bool = False


class GatewayLinkServicer(link_pb2_grpc.GatewayLinkServicer):
    def __init__(self, pool: ReaderPool, orchestrator_id: str, heartbeat_interval_s: float, *,
                 revocations: RevocationList | None = None, revocation_check_s: float = 1.0) -> None:
        self.pool = pool
        self.orchestrator_id = orchestrator_id
        self.heartbeat_interval_s = heartbeat_interval_s
        # The CRL sent to every gateway; one watch for all open links looks at it every
        # revocation_check_s (not one per link: a thousand idle links cost one stat a second).
        self.revocations = revocations
        self.revocation_check_s = revocation_check_s
        self._linked: dict[int, tuple[GatewaySession, PeerIdentity]] = {}
        self._crl_watch: asyncio.Task | None = None
        # Heartbeats and silence: one watch for all open links (_watch_heartbeats), not two
        # timers per link and message (a thousand idle links cost one scan a quarter interval).
        self._open: dict[int, _Link] = {}
        self._heartbeat_watch: asyncio.Task | None = None

    @rpc_errors
    async def Connect(self, request_iterator, context):
        first = await anext(request_iterator.__aiter__(), None)
        if first is None or first.WhichOneof("message") != "hello":
            raise InvalidArgument("the first message on the link must be a hello", field="hello")
        hello = first.hello
        check_message(hello, "hello")       # shared/limits.py: what it announces reaches every pool client
        if not hello.gateway_id:
            raise InvalidArgument("hello.gateway_id is empty", field="hello.gateway_id")
        peer = peer_identity(context)     # None only on a plaintext (--insecure) server
        if peer is not None and peer.name != hello.gateway_id:
            raise PermissionDenied(f"hello names gateway {quoted(hello.gateway_id)} but the certificate is "
                                   f"issued to {peer.name!r}", gateway_id=quoted(hello.gateway_id),
                                   certificate=peer.name)
        certificate = peer_certificate(context)
        if peer is not None and certificate is not None:
            place = enrolled_place(hello, enrollment_of(certificate), peer)
        else:                             # plaintext development link: nobody to ask but the hello
            place = Enrollment(hello.site, dict(hello.labels))
        # The hello carries the whole inventory: a returning gateway's readers are re-read.
        session = GatewaySession(gateway_id=hello.gateway_id, site=place.site, labels=dict(place.labels),
                                 readers={r.reader_id: convert.reader_from_proto(r) for r in hello.readers},
                                 version=hello.version)
        self.pool.attach(session)
        link = _Link(session)
        link.reader = asyncio.create_task(self._incoming(request_iterator, link))
        self._open[id(session)] = link
        if self._heartbeat_watch is None or self._heartbeat_watch.done():
            self._heartbeat_watch = asyncio.create_task(self._watch_heartbeats())
        if peer is not None and self.revocations is not None:
            self._follow(session, peer)
        try:
            yield link_pb2.OrchestratorMessage(welcome=link_pb2.Welcome(
                orchestrator_id=self.orchestrator_id, heartbeat_interval_ms=int(self.heartbeat_interval_s * 1000)))
            link.last_sent = time.monotonic()
            while True:
                item = await session.outbox.get()
                if GatewaySession.is_close_marker(item) or session.closed:
                    return
                if isinstance(item, CardlineError):
                    raise item            # the gateway's certificate was revoked
                if item is _HEARTBEAT:
                    link.beat_queued = False
                    link.sequence += 1
                    item = link_pb2.OrchestratorMessage(heartbeat=link_pb2.Heartbeat(sequence=link.sequence))
                yield item if isinstance(item, link_pb2.OrchestratorMessage) else command_to_proto(item)
                link.last_sent = time.monotonic()
        finally:
            link.reader.cancel()
            self._open.pop(id(session), None)
            if not self._open and self._heartbeat_watch is not None:
                self._heartbeat_watch.cancel()
                self._heartbeat_watch = None
            self._linked.pop(id(session), None)
            if not self._linked and self._crl_watch is not None:
                self._crl_watch.cancel()
                self._crl_watch = None
            self.pool.detach(session)

    async def _watch_heartbeats(self) -> None:
        """While links are open, every quarter heartbeat interval: a heartbeat to each link that
        sent nothing for an interval (the gateway notices a link that died silently — NAT,
        firewall: no FIN, no RST — by their absence and redials); a link whose gateway sent
        nothing for three intervals is ended as fallen silent."""
        interval = self.heartbeat_interval_s
        woke = time.monotonic()
        while self._open:
            await asyncio.sleep(interval / 4)
            now = time.monotonic()
            # This process stood still (a long stretch of work on the loop): what the gateways
            # sent meanwhile is read first, then silence is judged.
            stalled, woke = now - woke > interval, now
            for link in list(self._open.values()):
                if now - link.last_heard >= 3 * interval and not stalled:
                    if not link.silent and link.reader is not None:
                        link.silent = True
                        link.reader.cancel()        # _incoming detaches the gateway
                elif (not link.beat_queued and now - link.last_sent >= interval
                      and not link.session.outbox.full()):
                    link.beat_queued = True
                    link.session.outbox.put_nowait(_HEARTBEAT)

    def _follow(self, session: GatewaySession, peer: PeerIdentity) -> None:
        """Sends SESSION the current CRL and puts it under the CRL watch."""
        self._linked[id(session)] = (session, peer)
        self._tell(session, peer)
        if self._crl_watch is None or self._crl_watch.done():
            self._crl_watch = asyncio.create_task(self._watch_revocations())

    def _tell(self, session: GatewaySession, peer: PeerIdentity) -> None:
        """Ends the link (UNAUTHENTICATED) when the gateway's own certificate is revoked, else
        sends it the current CRL."""
        assert self.revocations is not None
        if self.revocations.is_revoked(peer.serial):
            log.warning("gateway certificate revoked; closing its link", gateway_id=peer.name,
                        serial=f"{peer.serial:x}")
            self._linked.pop(id(session), None)
            session.outbox.put_nowait(Unauthenticated(
                f"the certificate of gateway {peer.name!r} (serial {peer.serial:x}) has been revoked",
                name=peer.name))
        elif self.revocations.der is not None:
            session.outbox.put_nowait(link_pb2.OrchestratorMessage(
                revocations=link_pb2.RevocationList(crl_der=self.revocations.der)))

    async def _watch_revocations(self) -> None:
        """While links are open: looks at the CRL file every revocation_check_s and, when it
        changed, tells every linked gateway (_tell)."""
        assert self.revocations is not None
        seen = self.revocations.number
        while self._linked:
            await asyncio.sleep(self.revocation_check_s)
            number = self.revocations.refresh()
            if number == seen:
                continue
            seen = number
            for session, peer in list(self._linked.values()):
                self._tell(session, peer)

    async def _incoming(self, request_iterator, link: _Link) -> None:
        """Reads until the gateway goes away or falls silent for three heartbeat intervals
        (_watch_heartbeats cancels it then)."""
        session = link.session
        try:
            async for msg in request_iterator:
                link.last_heard = time.monotonic()
                self.pool.seen(session)
                kind = msg.WhichOneof("message")
                if kind == "heartbeat":          # its presence is all it says (one int, nothing to bound)
                    continue
                try:
                    check_message(msg)
                except InvalidArgument as exc:
                    if kind != "step_result":
                        log.warning("gateway message over the limits ignored", gateway_id=session.gateway_id,
                                    kind=kind, error=exc.message)
                        continue
                    session.resolve(msg.step_result.command_id, exc)     # the step fails, with the reason
                    continue
                if kind == "step_result":
                    result = msg.step_result
                    try:
                        value: cards.StepValue | CardlineError = convert.value_from_outcome(result.outcome)
                    except CardlineError as exc:
                        value = exc
                    session.resolve(result.command_id, value)
                elif kind == "reader_event":
                    event, reader = convert.reader_event_from_proto(msg.reader_event)
                    self.pool.reader_event(session, event, reader)
        except asyncio.CancelledError:
            if link.silent:
                log.warning("gateway fell silent for three heartbeat intervals; detaching it",
                            gateway_id=session.gateway_id, silence_s=3 * self.heartbeat_interval_s)
                self.pool.fell_silent(session)
        except Exception:  # a broken stream ends the session
            log.exception("gateway link broke", gateway_id=session.gateway_id)
        finally:
            self.pool.detach(session)
