"""`cardline process ...` (ProcessService)."""
from __future__ import annotations

import json

import typer
from rich.console import Console

from orchestrator.cli.client import (
    JSON,
    ORCHESTRATOR,
    REQUEST_ID,
    all_pages,
    as_json,
    console,
    enum_value,
    label,
    print_json,
    print_table,
    secret_inputs,
    secrets_from_stdin,
    stub,
    when,
)
from shared.cli import CliFail
from shared.proto import card_service_pb2, common_pb2, process_service_pb2_grpc
from shared.proto import process_service_pb2 as pb


def definition(processes: process_service_pb2_grpc.ProcessServiceStub, name: str) -> pb.ProcessDefinition | None:
    definitions = all_pages(processes.ListProcessDefinitions, pb.ListProcessDefinitionsRequest(), "definitions")
    return next((d for d in definitions if d.name == name), None)


def _value(text: str) -> common_pb2.Value:
    """TEXT, or @Type:template:id for a stored object's CoreObjectDescriptor."""
    if text.startswith("@") and text.count(":") == 2:
        kind, template, object_id = text[1:].split(":")
        return common_pb2.Value(descriptor=common_pb2.CoreObjectDescriptor(type=kind, template=template, id=object_id))
    return common_pb2.Value(text=text)


def _state(text: str) -> int:
    return enum_value(pb.ProcessState, text, "--state")


def _task_type(value: int) -> str:
    """TASK_TYPE_CARD_PRODUCTION -> card_production, as in process definitions."""
    return label(card_service_pb2.TaskType, value).replace(" ", "_")


def register(root: typer.Typer) -> None:
    process = typer.Typer(help="Processes: definitions and instances.", no_args_is_help=True)

    @process.command("list")
    def process_list(json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """The process definitions the orchestrator loaded."""
        definitions = all_pages(stub(process_service_pb2_grpc.ProcessServiceStub, orchestrator_addr)
                                .ListProcessDefinitions, pb.ListProcessDefinitionsRequest(), "definitions")
        if json_output:
            print_json([as_json(d) for d in definitions])
            return
        print_table("process", "inputs", "secret inputs", "tasks",
                    rows=[(d.name, ", ".join(d.inputs), ", ".join(d.secret_inputs),
                           " → ".join(_task_type(t) for t in d.task_types)) for d in definitions])

    @process.command("instances")
    def process_instances(
        definition_name: str = typer.Option("", "--process", help="Only instances of this process definition."),
        state: str = typer.Option("", help="Only instances in this state: running, succeeded or failed."),
        limit: int = typer.Option(0, "--limit", help="At most this many (0: all)."),
        json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Process instances, newest first."""
        request = pb.ListProcessInstancesRequest(definition=definition_name,
                                                 state=pb.ProcessState.ValueType(_state(state)))
        found = all_pages(stub(process_service_pb2_grpc.ProcessServiceStub, orchestrator_addr).ListProcessInstances,
                          request, "instances", limit)
        if json_output:
            print_json([as_json(i) for i in found])
            return
        print_table("instance", "process", "state", "created", "finished", "error",
                    rows=[(i.id, i.definition, label(pb.ProcessState, i.state), when(i.created_at),
                           when(i.finished_at), f"{i.error.reason}: {i.error.message}" if i.error.reason else "")
                          for i in found])

    @process.command("start")
    def process_start(
        name: str,
        inputs: list[str] = typer.Option([], "--input", "-i", help="NAME=TEXT, or NAME=@Type:template:id for a "
                                                                    "stored object (repeatable)."),
        secrets_stdin: bool = typer.Option(False, "--secrets-stdin",
                                           help="Read secret inputs as NAME=VALUE lines from standard input "
                                                "(otherwise they are prompted for, hidden)."),
        request_id: str = REQUEST_ID,
        json_output: bool = typer.Option(False, "--json", help="Print the finished instance as JSON."),
        orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Start a process instance and follow it."""
        processes = stub(process_service_pb2_grpc.ProcessServiceStub, orchestrator_addr)
        request = pb.StartProcessRequest(process=name, request_id=request_id)
        for item in inputs:
            key, sep, value = item.partition("=")
            if not sep:
                raise CliFail(f"--input {item!r}: expected NAME=VALUE", 2)
            request.inputs[key].CopyFrom(_value(value))
        found = definition(processes, name)
        request.secret_inputs.update(secret_inputs(found.secret_inputs if found else [],
                                                   secrets_from_stdin(secrets_stdin)))
        instance = None
        for response in processes.StartProcess(request):
            where = ("on_error " if response.on_error else "") + (
                f"task {response.task_index} {_task_type(response.task_type)}" if response.task_type else "")
            console.print(f"  [dim]{where}[/dim] {response.message}")
            if response.HasField("instance"):
                instance = response.instance
        if instance is None:
            raise CliFail(f"the orchestrator ended process {name} without reporting its instance")
        if json_output:
            print_json(as_json(instance))
        ok = instance.state == pb.PROCESS_STATE_SUCCEEDED
        console.print(f"[{'green' if ok else 'red'}]process {instance.id} {pb.ProcessState.Name(instance.state)}[/]")
        raise typer.Exit(0 if ok else 1)

    @process.command("show")
    def process_show(instance_id: str, json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """A process instance: state, error, tasks and process map."""
        instance = stub(process_service_pb2_grpc.ProcessServiceStub, orchestrator_addr).GetProcessInstance(
            pb.GetProcessInstanceRequest(process_instance_id=instance_id)).instance
        if json_output:
            print_json(as_json(instance))
            return
        out = Console(soft_wrap=True, highlight=False)
        out.print(f"process {instance.id} ({instance.definition}) {pb.ProcessState.Name(instance.state)}", markup=False)
        out.print(f"  created {when(instance.created_at)}, finished {when(instance.finished_at)}", markup=False)
        if instance.error.reason:
            out.print(f"  error {instance.error.reason}: {instance.error.message}", markup=False)
        out.print(f"  tasks {', '.join(instance.task_ids) or '-'}", markup=False)
        for key, value in sorted(as_json(instance).get("process_map", {}).items()):
            out.print(f"  {key} = {json.dumps(value)}", markup=False)

    root.add_typer(process, name="process")
