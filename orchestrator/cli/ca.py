"""`cardline reconcile` and `cardline ca-requests` (CaService: the CA request journal, rule C16)."""
from __future__ import annotations

import typer
from rich.console import Console

from orchestrator.cli.client import (
    JSON,
    ORCHESTRATOR,
    all_pages,
    as_json,
    label,
    print_json,
    print_table,
    stub,
    when,
)
from shared.proto import ca_service_pb2 as pb
from shared.proto import ca_service_pb2_grpc
from shared.serials import show_serial


def register(root: typer.Typer) -> None:
    @root.command("reconcile")
    def reconcile(json_output: bool = JSON,
                  orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """Run a reconciliation now (rule C16): pending CA requests are settled at their CA,
        tasks and processes no live run owns are ended."""
        report = stub(ca_service_pb2_grpc.CaServiceStub, orchestrator_addr).Reconcile(pb.ReconcileRequest())
        if json_output:
            print_json(as_json(report))
            return
        Console().print(f"examined {report.examined} pending CA requests: {report.stored} certificates found and "
                        f"stored, {report.not_issued} not issued; {report.tasks_ended} tasks/processes ended")

    requests = typer.Typer(help="The CA request journal (rule C16): every request sent to a CA and how it "
                                "ended. Without a command: the list.", invoke_without_command=True)

    @requests.callback()
    def ca_requests(ctx: typer.Context,
                    unsettled: bool = typer.Option(False, "--unsettled", help="Only requests still pending."),
                    task_id: str = typer.Option("", "--task-id", help="Only requests of this task."),
                    json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        if ctx.invoked_subcommand is None:
            _list(unsettled, task_id, json_output, orchestrator_addr)

    @requests.command("list")
    def ca_requests_list(unsettled: bool = typer.Option(False, "--unsettled", help="Only requests still pending."),
                         task_id: str = typer.Option("", "--task-id", help="Only requests of this task."),
                         json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """Every request sent to a CA and how it ended, oldest first."""
        _list(unsettled, task_id, json_output, orchestrator_addr)

    @requests.command("show")
    def ca_requests_show(request_id: str, json_output: bool = JSON,
                         orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """One CA request: its CA, task, state, serial and certificate."""
        r = stub(ca_service_pb2_grpc.CaServiceStub, orchestrator_addr).GetCaRequest(
            pb.GetCaRequestRequest(request_id=request_id)).request
        if json_output:
            print_json(as_json(r))
            return
        Console(soft_wrap=True, highlight=False).print(
            f"CA request {r.request_id}\n  CA {r.ca}\n  task {r.task_id}\n  state {_state(r.state)}\n"
            f"  serial {show_serial(r.serial_hex) or '-'}\n  certificate {r.certificate_id or '-'}\n"
            f"  created {when(r.created_at)}, updated {when(r.updated_at)}", markup=False)

    root.add_typer(requests, name="ca-requests")


def _state(value: int) -> str:
    return label(pb.CaRequestState, value).replace(" ", "_")


def _list(unsettled: bool, task_id: str, json_output: bool, orchestrator_addr: list[str]) -> None:
    rows = all_pages(stub(ca_service_pb2_grpc.CaServiceStub, orchestrator_addr).ListCaRequests,
                     pb.ListCaRequestsRequest(unsettled_only=unsettled, task_id=task_id), "requests")
    if json_output:
        print_json([as_json(r) for r in rows])
        return
    print_table("request", "CA", "state", "serial", "certificate", "updated",
                rows=[(r.request_id, r.ca, _state(r.state), show_serial(r.serial_hex), r.certificate_id,
                       when(r.updated_at)) for r in rows])
