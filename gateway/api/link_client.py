"""The gateway's outbound link: one long-lived stream to the orchestrator carrying the
inventory, reader events, heartbeats and step results up, and commands down.

The gateway dials out (stations behind NAT work); on every connection it announces its
current inventory again. Given several orchestrator addresses it attaches to one at a time:
a link that fails or drops makes it dial the next address after a short jittered pause
(at most the minimum backoff), and a whole round of addresses that failed makes it back off
exponentially, with full jitter, before the next round (docs/operator-guide.md, failover).
"""
from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence
from typing import Protocol

import grpc

from gateway.core.executor import LinkCaller, StepExecutor
from gateway.core.registry import ReaderRegistry
from shared import convert
from shared.errors import CardlineError, ConfigurationError
from shared.logging import get_logger
from shared.proto import link_pb2, link_pb2_grpc
from shared.rpc import MESSAGE_SIZE_OPTIONS
from shared.tls import RevocationList
from shared.version import VERSION

log = get_logger(__name__)


class LinkObserver(Protocol):
    """What the link tells the metrics (gateway/metrics.py)."""
    def link_changed(self, up: bool, address: str) -> None: ...
    def redialling(self) -> None: ...


class _Unobserved:
    def link_changed(self, up: bool, address: str) -> None:
        pass

    def redialling(self) -> None:
        pass


class OrchestratorLink:
    def __init__(self, targets: str | Sequence[str], gateway_id: str, registry: ReaderRegistry,
                 executor: StepExecutor, *,
                 site: str = "", labels: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 revocations: RevocationList | None = None,
                 backoff_min_s: float = 0.2, backoff_max_s: float = 10.0,
                 observer: LinkObserver | None = None) -> None:
        self.observer: LinkObserver = observer or _Unobserved()
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ConfigurationError(f"gateway {gateway_id}: no orchestrator address to dial")
        self.target = self.targets[0]   # the address dialled now (or last)
        self.attached: str | None = None  # the address whose orchestrator welcomed this link, while it holds
        self.gateway_id = gateway_id
        self.registry = registry
        self.executor = executor
        self.site = site
        self.labels = labels or {}
        self.credentials = credentials
        self.revocations = revocations      # takes the CRLs the orchestrator sends
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.connected = asyncio.Event()
        # One caller for every address: the orchestrators of one deployment share the steps
        # they send (a replica that takes a task over resends its step, docs/pool.md).
        self.caller = LinkCaller(",".join(self.targets))

    async def run_forever(self) -> None:
        failed_rounds = 0
        failed_in_round = 0
        for target in itertools.cycle(self.targets):     # in order, for ever
            self.target = target
            try:
                await self._session()
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                refused = isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT)
                # A refused certificate (revoked, wrong role, wrong gateway id) or hello (labels over
                # docs/limits.md) is an operator's problem: logged as an error with the
                # orchestrator's reason, and retried with backoff.
                (log.error if refused else log.warning)(
                    "orchestrator refused this gateway" if refused else "orchestrator link down", target=self.target,
                    error=exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc),
                    detail=exc.details() if isinstance(exc, grpc.aio.AioRpcError) else None)
            finally:
                was_attached = self.attached is not None
                self.attached = None
                self.connected.clear()
                self.observer.link_changed(False, self.target)
            if was_attached:          # a link that held: a fresh round starts at the next address
                failed_rounds = failed_in_round = 0
            else:
                failed_in_round += 1
            if failed_in_round >= len(self.targets):     # every address failed once: back off
                failed_rounds += 1
                failed_in_round = 0
                ceiling = self.backoff_min_s * 2 ** min(failed_rounds, 16)
            else:
                ceiling = self.backoff_min_s
            await asyncio.sleep(random.uniform(0, min(self.backoff_max_s, ceiling)))
            self.observer.redialling()

    async def _session(self) -> None:
        # Mutual TLS with the gateway's own certificate; plaintext only when the gateway was
        # started with --insecure (development).
        channel = (grpc.aio.secure_channel(self.target, self.credentials, options=MESSAGE_SIZE_OPTIONS)
                   if self.credentials else grpc.aio.insecure_channel(self.target, options=MESSAGE_SIZE_OPTIONS))
        outbox: asyncio.Queue[link_pb2.GatewayMessage] = asyncio.Queue()
        running: set[asyncio.Task] = set()
        unsubscribe = self.registry.subscribe(
            lambda kind, reader: outbox.put_nowait(link_pb2.GatewayMessage(
                reader_event=convert.reader_event_to_proto(kind, reader))))
        heartbeat: asyncio.Task | None = None
        sender: asyncio.Task | None = None
        try:
            async with channel:
                # Written by a task of ours rather than consumed by grpc from an async generator:
                # when the link drops, grpc would close a generator that is still waiting on
                # the outbox ("aclose(): asynchronous generator is already running").
                call = link_pb2_grpc.GatewayLinkStub(channel).Connect()
                sender = asyncio.create_task(self._send(call, outbox))
                silence_s = 30.0         # until the orchestrator says how often it beats
                while True:
                    try:
                        msg = await asyncio.wait_for(call.read(), silence_s)
                    except TimeoutError:
                        call.cancel()
                        raise ConnectionError(f"orchestrator silent for {silence_s:g} s") from None
                    except asyncio.CancelledError:
                        if sender.done() and not sender.cancelled() and sender.exception() is not None:
                            raise ConnectionError(f"sending to the orchestrator failed: {sender.exception()}") from None
                        raise
                    if msg is grpc.aio.EOF:
                        break
                    assert isinstance(msg, link_pb2.OrchestratorMessage)  # read() gives EOF or a message
                    kind = msg.WhichOneof("message")
                    if kind == "welcome":
                        self.attached = self.target
                        log.info("attached to orchestrator", orchestrator=msg.welcome.orchestrator_id,
                                 address=self.target, addresses=len(self.targets))
                        self.connected.set()
                        self.observer.link_changed(True, self.target)
                        interval = max(msg.welcome.heartbeat_interval_ms, 100) / 1000
                        silence_s = 3 * interval
                        heartbeat = asyncio.create_task(self._heartbeats(outbox, interval))
                    elif kind == "revocations":
                        self._take_crl(msg.revocations.crl_der)
                    elif kind == "command":
                        task = asyncio.create_task(self._run_command(msg.command, outbox))
                        running.add(task)
                        task.add_done_callback(running.discard)
        finally:
            unsubscribe()
            for job in (heartbeat, sender, *running):
                if job is not None:
                    job.cancel()
            await asyncio.gather(*(t for t in (heartbeat, sender) if t is not None), return_exceptions=True)

    def _take_crl(self, der: bytes) -> None:
        if self.revocations is None:     # a plaintext link: no certificates to refuse
            return
        try:
            self.revocations.update(der, f"the orchestrator at {self.target}")
        except ConfigurationError as exc:  # not signed by our CA: keep the CRL we have
            log.error("CRL from the orchestrator refused", error=exc.message)

    async def _send(self, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue) -> None:
        """The hello with the current inventory, then everything put in the outbox. A write
        that fails because the link is down ends this task: the reading side reports it."""
        try:
            readers = await self.registry.refresh()
            await call.write(link_pb2.GatewayMessage(hello=link_pb2.GatewayHello(
                gateway_id=self.gateway_id, site=self.site, labels=self.labels, version=VERSION,
                readers=[convert.reader_to_proto(r) for r in readers])))
            while True:
                await call.write(await outbox.get())
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return                       # the call ended: read() says why
        except asyncio.CancelledError:
            raise
        except Exception:
            call.cancel()                # e.g. the inventory could not be read: redial
            raise

    async def _heartbeats(self, outbox: asyncio.Queue, interval: float) -> None:
        sequence = 0
        while True:
            await asyncio.sleep(interval)
            sequence += 1
            outbox.put_nowait(link_pb2.GatewayMessage(heartbeat=link_pb2.Heartbeat(sequence=sequence)))

    async def _run_command(self, command: link_pb2.Command, outbox: asyncio.Queue) -> None:
        replayed = False
        try:
            step = convert.step_from_proto(command.step)
            value, replayed = await self.executor.run(command.reader_id, step, command.task_id, command.step_number,
                                                      caller=self.caller)
            outcome = convert.value_to_outcome(value)
        except CardlineError as exc:
            outcome = convert.error_to_outcome(exc)
        except Exception as exc:  # reported to the orchestrator, never lost
            log.exception("step crashed", command_id=command.command_id)
            outcome = convert.error_to_outcome(CardlineError(f"gateway error: {type(exc).__name__}: {exc}"))
        outbox.put_nowait(link_pb2.GatewayMessage(step_result=link_pb2.StepResult(
            command_id=command.command_id, outcome=outcome, replayed=replayed)))
