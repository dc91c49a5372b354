"""`cardline tasks ...` (CardService's tasks: card production and card operations)."""
from __future__ import annotations

import typer
from rich.console import Console

from orchestrator.cli.client import (
    JSON,
    ORCHESTRATOR,
    all_pages,
    as_json,
    enum_value,
    label,
    print_json,
    print_table,
    stub,
    when,
)
from shared.proto import card_service_pb2 as pb
from shared.proto import card_service_pb2_grpc


def show_task(task: pb.Task) -> None:
    Console(soft_wrap=True, highlight=False).print(
        f"task {task.id} ({label(pb.TaskType, task.type)}) {label(pb.TaskState, task.state)}\n"
        f"  reader {task.gateway_id or '-'} {task.reader_id}\n  card {task.card_id or '-'}\n"
        f"  certificates {', '.join(task.certificate_ids) or '-'}\n"
        f"  created {when(task.created_at)}, finished {when(task.finished_at)}"
        + (f"\n  error {task.error.reason}: {task.error.message}" if task.error.reason else ""), markup=False)


def register(root: typer.Typer) -> None:
    tasks = typer.Typer(help="Card tasks: productions and card operations.", no_args_is_help=True)

    @tasks.command("list")
    def tasks_list(
        process_instance_id: str = typer.Option("", "--process-instance-id",
                                                help="Only tasks of this process instance."),
        card_id: str = typer.Option("", "--card-id", help="Only tasks on this card."),
        state: str = typer.Option("", help="Only tasks in this state: running, succeeded or failed."),
        limit: int = typer.Option(0, "--limit", help="At most this many (0: all)."),
        json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Card tasks, oldest first."""
        request = pb.ListTasksRequest(process_instance_id=process_instance_id, card_id=card_id,
                                      state=pb.TaskState.ValueType(enum_value(pb.TaskState, state, "--state")))
        found = all_pages(stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).ListTasks, request,
                          "tasks", limit)
        if json_output:
            print_json([as_json(t) for t in found])
            return
        print_table("task", "type", "state", "gateway", "reader", "card", "created", "error",
                    rows=[(t.id, label(pb.TaskType, t.type), label(pb.TaskState, t.state), t.gateway_id,
                           t.reader_id, t.card_id, when(t.created_at),
                           f"{t.error.reason}: {t.error.message}" if t.error.reason else "") for t in found])

    @tasks.command("show")
    def tasks_show(task_id: str, json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """One card task: its state, reader, card, certificates and error."""
        task = stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).GetTask(
            pb.GetTaskRequest(task_id=task_id)).task
        if json_output:
            print_json(as_json(task))
            return
        show_task(task)

    root.add_typer(tasks, name="tasks")
