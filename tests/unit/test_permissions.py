"""The permission table (shared/permissions.py): complete for every service of cardline's
protos, documented as it is in code (docs/permissions.md), and keeping the promises the
roles make (an auditor changes nothing, the orchestrator's certificate is no client)."""
from __future__ import annotations

import importlib
import pathlib
import re

import pytest
from google.protobuf import descriptor_pool

from shared.errors import ConfigurationError
from shared.permissions import PERMISSIONS, markdown_table, methods_of, missing_rows, require_rows
from shared.pki import CLIENT_ROLES, ROLES
from shared.tls import OPEN_SERVICES, AuthorizationInterceptor

ROOT = pathlib.Path(__file__).resolve().parents[2]
CARDLINE_PACKAGES = ("cardline.orchestrator.", "cardline.gateway.")
#: How the names of RPCs that only read begin (docs/api.md names them so).
READ_VERBS = ("Get", "List", "Search", "Watch", "Verify")   # VerifyAudit reads the chain, changes nothing


def cardline_services() -> list[str]:
    """Every service of cardline's protos: of each generated module under shared/proto/cardline/
    (`make protos` makes one per .proto file)."""
    services = []
    for path in sorted((ROOT / "shared" / "proto" / "cardline").rglob("*_pb2.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        generated = importlib.import_module(module)
        services += [s.full_name for s in generated.DESCRIPTOR.services_by_name.values()
                     if s.full_name.startswith(CARDLINE_PACKAGES)]
    return services


def documented_table() -> dict[str, frozenset[str]]:
    text = (ROOT / "docs" / "permissions.md").read_text()
    header = "| RPC | " + " | ".join(ROLES) + " |"
    assert header in text, f"docs/permissions.md has no table headed {header}"
    rows = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        method = re.fullmatch(r"`(.+)`", cells[0])
        assert method and len(cells) == len(ROLES) + 1, f"docs/permissions.md: malformed row {line!r}"
        rows[method.group(1)] = frozenset(role for role, cell in zip(ROLES, cells[1:], strict=True) if cell)
    return rows


def test_every_rpc_of_every_cardline_service_has_a_row_and_every_row_an_rpc():
    services = cardline_services()
    assert len(services) >= 9, services                 # the proto modules were found
    assert missing_rows(services) == []
    assert sorted(PERMISSIONS) == sorted(methods_of(services))


def test_rows_name_only_known_roles_and_every_role_may_call_something():
    named = {role for roles in PERMISSIONS.values() for role in roles}
    assert named == set(ROLES)


def test_the_orchestrators_certificate_is_no_client_and_calls_only_other_replicas():
    assert "orchestrator" not in CLIENT_ROLES
    assert [m for m, roles in PERMISSIONS.items() if "orchestrator" in roles] == [
        "cardline.orchestrator.v1.ReplicaService/RunStep"]
    assert PERMISSIONS["cardline.orchestrator.v1.ReplicaService/RunStep"] == frozenset({"orchestrator"})


def test_auditor_may_call_only_rpcs_that_read():
    audited = [m for m, roles in PERMISSIONS.items() if "auditor" in roles]
    assert audited and [m for m in audited if not m.rpartition("/")[2].startswith(READ_VERBS)] == []


def test_gateway_may_open_the_link_and_nothing_else():
    link = "cardline.orchestrator.v1.GatewayLink/Connect"
    assert [m for m, roles in PERMISSIONS.items() if "gateway" in roles] == [link]
    assert PERMISSIONS[link] == {"gateway"}


def test_service_drives_readers_and_sees_no_cards_certificates_or_processes():
    served = {m.partition("/")[0].rpartition(".")[2] for m, roles in PERMISSIONS.items() if "service" in roles}
    assert served == {"ReaderPoolService", "LeaseService"}


def test_operator_may_not_revoke_reconcile_or_set_a_puk_directly():
    for method in ("CertificateService/ChangeCertificateState", "CaService/Reconcile", "CardService/SetCardPuk"):
        assert PERMISSIONS[f"cardline.orchestrator.v1.{method}"] == {"admin"}, method


def test_docs_permissions_table_equals_the_table_in_code():
    assert documented_table() == dict(PERMISSIONS), (
        "docs/permissions.md differs from shared/permissions.py; its table should read:\n" + markdown_table())


def test_a_service_served_without_rows_stops_start_up_naming_its_rpcs():
    table = {m: roles for m, roles in PERMISSIONS.items() if not m.startswith("cardline.orchestrator.v1.CaService/")}
    with pytest.raises(ConfigurationError) as err:
        require_rows("orchestrator", ["cardline.orchestrator.v1.CaService", "cardline.orchestrator.v1.CardService"],
                     table)
    assert "4 RPC(s) have no row" in err.value.message
    assert "cardline.orchestrator.v1.CaService/Reconcile" in err.value.message
    assert "CardService" not in err.value.message
    require_rows("orchestrator", ["cardline.orchestrator.v1.CardService"], table)      # complete: no error


def test_interceptor_refuses_an_rpc_without_a_row_to_every_role_and_opens_health_to_all():
    interceptor = AuthorizationInterceptor({"cardline.orchestrator.v1.CaService/Reconcile": frozenset({"admin"})})
    assert interceptor.allowed("/cardline.orchestrator.v1.CaService/Reconcile") == {"admin"}
    assert interceptor.allowed("/cardline.orchestrator.v1.CaService/GetCaRequest") == frozenset()
    assert interceptor.allowed("/grpc.health.v1.Health/Check") is None
    assert "grpc.health.v1.Health" in OPEN_SERVICES
    assert descriptor_pool.Default().FindServiceByName("cardline.orchestrator.v1.CaService")   # a real service
