"""The rule tests' one fixture module: an in-process orchestrator (orchestrator/app.py, the
real wiring: store on SQLite, the local CA, configuration from examples/ plus the test's own
encodings and processes) with a FakeGateway (tests/support/fake_gateway.py) attached over the
real gateway link, driven through the orchestrator's services (card tasks, processes,
certificates), never its client gRPC API.

Every read of the store the rule tests assert on goes through `RuleRig` below, so a change of
the store's interface is adapted here, in one place.
"""
from __future__ import annotations

import contextlib
import pathlib
import shutil
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cryptography import x509

from orchestrator import app as orchestrator_app
from orchestrator.ca.local import LocalCa
from orchestrator.domain.processes import CoreObjectDescriptor
from orchestrator.services.card_tasks import CardTaskOutcome
from orchestrator.services.pool import ReaderSelector
from orchestrator.services.production import CertificateOrder, production_order
from shared import cards, config
from tests.support.fake_gateway import FakeGateway, FakeToken
from tests.support.pki import default_pki
from tests.support.transport_puk import transport_puk, write_transport_key

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
PIN = "246810"               # the user PIN the tests' cards get (or have)
ISSUED, START = "Issued", "Active"   # the example certificate graph's internal issued and start states


def fake_token(**kw) -> FakeToken:
    """A blank card as the tests' card templates expect it: its PUK is the transport PUK for
    its serial (tests/support/transport_puk.py) unless the test gives another."""
    so_pin = kw.pop("so_pin", None)
    token = FakeToken(user_pin=kw.pop("user_pin", PIN), **kw)
    token.so_pin = so_pin if so_pin is not None else transport_puk(token.serial)
    return token


def write_config(target: pathlib.Path, encodings: dict[str, str] | None = None,
                 processes: dict[str, str] | None = None, examples: pathlib.Path = EXAMPLES,
                 templates: dict[str, str] | None = None) -> pathlib.Path:
    """EXAMPLES (default: examples/) plus the test's own encodings, processes and template
    files (text dedented)."""
    shutil.copytree(examples, target, dirs_exist_ok=True)
    for name, text in (templates or {}).items():
        (target / "templates" / f"{name}.yaml").write_text(textwrap.dedent(text))
    for name, text in (encodings or {}).items():
        (target / "encodings" / f"{name}.ini").write_text(textwrap.dedent(text))
    for name, text in (processes or {}).items():
        (target / "processes" / f"{name}.yaml").write_text(textwrap.dedent(text))
    write_transport_key(target / "secrets")
    return target


def settings_for(tmp_path: pathlib.Path, config_dir: pathlib.Path, **overrides) -> config.OrchestratorSettings:
    return config.load(config.OrchestratorSettings, listen="127.0.0.1:0", data_dir=tmp_path / "orchestrator",
                       migrate=True,
                       config_dir=config_dir, step_timeout_s=overrides.pop("step_timeout_s", 10),
                       **default_pki().settings(), **overrides)


@dataclass
class RuleRig:
    orch: orchestrator_app.Orchestrator
    gateway: FakeGateway
    config_dir: pathlib.Path

    @property
    def token(self) -> FakeToken:
        return self.gateway.token

    # --- driving the orchestrator's services --------------------------------------------------

    async def produce(self, *templates: str, key_type: cards.KeyType = cards.KeyType.EC_P256,
                      token: FakeToken | None = None, subject: str = "CN=Rule Tester") -> CardTaskOutcome:
        """A card production of one certificate per template (ProduceCard's path)."""
        token = token or self.token
        order = production_order(self.orch.configuration.templates, ReaderSelector(reader_id=token.reader_id),
                                 subject, tuple(CertificateOrder(t, key_type) for t in templates), PIN,
                                 card_template="EmployeeCard")
        return await self.orch.card_tasks.run(order)

    async def process(self, name: str, **inputs):
        """Runs process NAME to its end; the ProcessInstanceRecord."""
        return await self.orch.processes.start(name, inputs)

    # --- the store, as the rules see it (the one place to adapt) -----------------------------

    def certificates(self, *, task_id: str | None = None, process_instance_id: str | None = None,
                     state: str | None = None):
        return self.orch.store.certificates.list(state=state, task_id=task_id,
                                                 process_instance_id=process_instance_id or None)

    def certificate(self, certificate_id: str):
        return self.orch.store.certificates.get(certificate_id)

    def relations(self, *, card_id: str | None = None, certificate_id: str | None = None):
        return self.orch.store.relations.list(source_id=card_id, target_id=certificate_id)

    def card(self, card_id: str):
        return self.orch.store.cards.get(card_id)

    def card_count(self) -> int:
        """Card objects made so far (every card belongs to the production task that made it)."""
        return len({t.card_id for t in self.orch.store.tasks.list() if t.card_id})

    def task(self, task_id: str):
        return self.orch.store.tasks.get(task_id)

    def tasks(self, process_instance_id: str):
        return self.orch.store.tasks.list(process_instance_id=process_instance_id)

    def process_instance(self, instance_id: str):
        return self.orch.store.processes.get(instance_id)

    def audit(self, *, object_id: str | None = None, action: str | None = None):
        return self.orch.store.audit.list(object_id=object_id, action=action)

    def ca_requests(self, task_id: str):
        return self.orch.store.ca_requests.list(task_id=task_id)

    def archived_key(self, certificate_id: str):
        return self.orch.store.archived_keys.get(certificate_id)

    # --- the CA ------------------------------------------------------------------------------

    def issued_by_ca(self) -> dict[str, bytes]:
        ca = self.orch.cas["local"]
        assert isinstance(ca, LocalCa)
        return ca.issued_by_request()

    def crl_reasons(self) -> dict[int, str]:
        """Serial -> CRL reason name of the local CA's current CRL."""
        out = {}
        for entry in x509.load_der_x509_crl(self.orch.cas["local"].crl_der()):
            try:
                out[entry.serial_number] = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
            except x509.ExtensionNotFound:
                out[entry.serial_number] = "unspecified"
        return out


def descriptor(instance, variable: str) -> CoreObjectDescriptor:
    return CoreObjectDescriptor.from_dict(instance.process_map[variable])


@contextlib.asynccontextmanager
async def rule_orchestrator(tmp_path: pathlib.Path, *, encodings: dict[str, str] | None = None,
                            processes: dict[str, str] | None = None, tokens: tuple[FakeToken, ...] = (),
                            boundary=None, examples: pathlib.Path = EXAMPLES,
                            templates: dict[str, str] | None = None, **settings) -> AsyncIterator[RuleRig]:
    """An orchestrator with the test's configuration (EXAMPLES plus ENCODINGS and PROCESSES)
    and one fake gateway ("station-1", site hq) holding TOKENS (default: one blank fake token);
    SETTINGS override the orchestrator's settings."""
    cfg = write_config(tmp_path / "config", encodings, processes, examples, templates)
    orch = await orchestrator_app.start(settings_for(tmp_path, cfg, **settings), boundary=boundary)
    gateway = FakeGateway("station-1", tokens or (fake_token(),), site="hq")
    try:
        await gateway.connect(orch.address)
        yield RuleRig(orch, gateway, cfg)
    finally:
        await gateway.close()
        await orch.stop()
