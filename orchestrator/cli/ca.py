"""`cardline reconcile` and `cardline ca-requests` (CaService: the CA request journal, rule C16)."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.client import ORCHESTRATOR, as_json, label, print_json, stub
from shared.proto import ca_service_pb2 as pb
from shared.proto import ca_service_pb2_grpc


def register(root: typer.Typer) -> None:
    @root.command("reconcile")
    def reconcile(json_output: bool = typer.Option(False, "--json", help="JSON output."),
                  orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Run a reconciliation now (rule C16): pending CA requests are settled at their CA,
        tasks and processes no live run owns are ended."""
        report = stub(ca_service_pb2_grpc.CaServiceStub, orchestrator_addr).Reconcile(pb.ReconcileRequest())
        if json_output:
            print_json({k: getattr(report, k) for k in ("examined", "stored", "not_issued", "tasks_ended")})
            return
        Console().print(f"examined {report.examined} pending CA requests: {report.stored} certificates found and "
                        f"stored, {report.not_issued} not issued; {report.tasks_ended} tasks/processes ended")

    @root.command("ca-requests")
    def ca_requests(unsettled: bool = typer.Option(False, "--unsettled", help="Only requests still pending."),
                    json_output: bool = typer.Option(False, "--json", help="JSON output."),
                    orchestrator_addr: str = ORCHESTRATOR) -> None:
        """The CA request journal (rule C16): every request sent to a CA and how it ended."""
        rows = stub(ca_service_pb2_grpc.CaServiceStub, orchestrator_addr).ListCaRequests(
            pb.ListCaRequestsRequest(unsettled_only=unsettled)).requests
        if json_output:
            print_json([as_json(r) for r in rows])
            return
        table = Table("request", "CA", "state", "serial", "certificate", "updated")
        for r in rows:
            table.add_row(r.request_id, r.ca, label(pb.CaRequestState, r.state).replace(" ", "_"), r.serial_hex,
                          r.certificate_id, r.updated_at.ToDatetime().isoformat(timespec="seconds"))
        Console().print(table)
