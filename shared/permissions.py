"""Who may call what: the one permission table of every cardline server.

Every RPC (full method name, `package.Service/Method`) maps to the roles (shared/pki.py
ROLES, the subject OU of the caller's certificate) allowed to call it. The authorising
interceptor of shared/tls.py reads it for every call: a role not in an RPC's row is
PERMISSION_DENIED, and an RPC in no row is refused to everyone. Servers check at start-up
that every RPC they serve has a row (`require_rows`), so a service added without rows stops
start-up, in tests and in production alike. docs/permissions.md shows this table
(`python -m shared.permissions` prints it; a unit test compares the two).

Why the rows are what they are (docs/permissions.md says it for operators):
- admin configures and repairs: everything of the client API, and a station's own
  GatewayService for diagnostics;
- operator runs what admins defined: productions, processes, orders, handling Issued
  certificates, and reads everything;
- auditor reads everything and changes nothing;
- service drives readers itself: leases and the raw steps on them, and the reader pool to
  find readers; it sees no cards, certificates or processes;
- gateway opens the gateway link and nothing else; orchestrator (the orchestrator's own
  server certificate) is no client: it calls only another replica's ReplicaService.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf import descriptor_pool

from shared.errors import ConfigurationError
from shared.pki import ROLES

ADMIN, OPERATOR, AUDITOR, SERVICE, GATEWAY = "admin", "operator", "auditor", "service", "gateway"
#: A replica's own certificate, calling another replica on the same database.
ORCHESTRATOR = "orchestrator"
#: Reads of cards, certificates, processes, orders and CA requests.
READ = frozenset({ADMIN, OPERATOR, AUDITOR})
#: Actions of the production floor.
OPERATE = frozenset({ADMIN, OPERATOR})
#: Configuration, secrets and repair.
ADMINISTER = frozenset({ADMIN})
#: Readers in the pool: everyone who reads, and services choosing readers to lease.
SEE_READERS = READ | {SERVICE}
#: Leases and raw steps.
DRIVE_READERS = frozenset({ADMIN, SERVICE})
#: Lease reads: auditors too.
SEE_LEASES = DRIVE_READERS | {AUDITOR}
#: The audit trail and its verification.
AUDIT = frozenset({ADMIN, AUDITOR})

ORCHESTRATOR_PACKAGE, GATEWAY_PACKAGE = "cardline.orchestrator.v1", "cardline.gateway.v1"


def _service(full_name: str, **methods: frozenset[str]) -> dict[str, frozenset[str]]:
    return {f"{full_name}/{method}": roles for method, roles in methods.items()}


#: Full method name -> roles allowed to call it.
PERMISSIONS: Mapping[str, frozenset[str]] = {
    **_service(f"{ORCHESTRATOR_PACKAGE}.CardService",
               ProduceCard=OPERATE, GetCard=READ, GetTask=READ, ListCards=READ, SetCardPuk=ADMINISTER,
               ListTasks=READ),
    **_service(f"{ORCHESTRATOR_PACKAGE}.CertificateService",
               GetCertificate=READ, ListCertificates=READ, SearchIssuedCertificates=READ,
               HandleIssuedCertificates=OPERATE, ChangeCertificateState=ADMINISTER, ListExpiringCertificates=READ),
    **_service(f"{ORCHESTRATOR_PACKAGE}.ProcessService",
               ListProcessDefinitions=READ, StartProcess=OPERATE, GetProcessInstance=READ,
               ListProcessInstances=READ),
    **_service(f"{ORCHESTRATOR_PACKAGE}.ReaderPoolService",
               ListGateways=SEE_READERS, ListReaders=SEE_READERS, WatchReaders=SEE_READERS),
    **_service(f"{ORCHESTRATOR_PACKAGE}.LeaseService",
               AcquireLease=DRIVE_READERS, RenewLease=DRIVE_READERS, ReleaseLease=DRIVE_READERS,
               GetLease=SEE_LEASES, ListLeases=SEE_LEASES, RunLeasedStep=DRIVE_READERS),
    **_service(f"{ORCHESTRATOR_PACKAGE}.OrderService",
               CreateOrder=OPERATE, WatchOrder=READ, ListOrders=READ, GetOrder=READ, CancelOrder=OPERATE),
    **_service(f"{ORCHESTRATOR_PACKAGE}.CaService",
               GetCaCertificate=READ, ListCaRequests=READ, GetCaRequest=READ, Reconcile=ADMINISTER),
    **_service(f"{ORCHESTRATOR_PACKAGE}.AuditService", ListAuditEvents=AUDIT, VerifyAudit=AUDIT),
    **_service(f"{ORCHESTRATOR_PACKAGE}.GatewayLink", Connect=frozenset({GATEWAY})),
    # Replicas on one database run steps on readers linked to one another (docs/replicas.md):
    # a replica's own certificate only, never a client's.
    **_service(f"{ORCHESTRATOR_PACKAGE}.ReplicaService", RunStep=frozenset({ORCHESTRATOR})),
    # A station's own service bypasses the orchestrator's leases, reader selectors and audit:
    # admins only, for diagnostics. The orchestrator never calls it (gateways dial out).
    **_service(f"{GATEWAY_PACKAGE}.GatewayService",
               ListReaders=ADMINISTER, RunStep=ADMINISTER, WatchReaders=ADMINISTER),
}


def methods_of(services: Iterable[str]) -> list[str]:
    """Full method names of SERVICES (full service names, from the protobuf descriptor pool:
    their generated modules must be imported)."""
    pool = descriptor_pool.Default()
    return [f"{service}/{method.name}" for service in services
            for method in pool.FindServiceByName(service).methods]


def missing_rows(services: Iterable[str], table: Mapping[str, frozenset[str]] = PERMISSIONS) -> list[str]:
    """RPCs of SERVICES that TABLE does not name."""
    return [method for method in methods_of(services) if method not in table]


def require_rows(what: str, services: Iterable[str], table: Mapping[str, frozenset[str]] = PERMISSIONS) -> None:
    """Raises ConfigurationError naming every RPC of SERVICES without a row in TABLE: a
    server must not start with an RPC nobody may call by accident."""
    missing = missing_rows(services, table)
    if missing:
        raise ConfigurationError(f"{what}: {len(missing)} RPC(s) have no row in the permission table "
                                 f"(shared/permissions.py, docs/permissions.md): {', '.join(missing)}")


def markdown_table(table: Mapping[str, frozenset[str]] = PERMISSIONS) -> str:
    """TABLE as docs/permissions.md shows it: one row per RPC, one column per role."""
    lines = ["| RPC | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for method, roles in table.items():
        lines.append(f"| `{method}` | " + " | ".join("✓" if role in roles else "" for role in ROLES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
