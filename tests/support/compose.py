"""docker-compose.yml and the Dockerfile as processes, for a machine without Docker.

What a container would see is mapped onto the host: the image's files (Dockerfile COPY) to
the repository, named volumes to directories of the test, bind mounts relative to the
compose file's directory, secrets to their files; every command line, environment value and
the image's settings file are rewritten with that map. The only other edits: each server
listens on a free port of 127.0.0.1 (CARDLINE_<SERVER>_LISTEN; containers listen on
0.0.0.0 each in its own network namespace), service host names become those addresses, and
the PostgreSQL service is the test's PostgreSQL database."""
from __future__ import annotations

import json
import pathlib
import re
import shlex
from dataclasses import dataclass, field

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Image:
    env: dict[str, str]
    copies: dict[str, str]          # container path -> repository path (relative)
    user: str
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]


def _json_or_shell(text: str) -> list[str]:
    text = text.strip()
    return json.loads(text) if text.startswith("[") else ["/bin/sh", "-c", text]


def parse_dockerfile(path: pathlib.Path = ROOT / "Dockerfile") -> Image:
    lines = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    env: dict[str, str] = {}
    copies: dict[str, str] = {}
    user = workdir = ""
    entrypoint: list[str] = []
    cmd: list[str] = []
    healthcheck: list[str] = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif word == "COPY":
            *sources, target = rest.split()
            if len(sources) == 1 and target.startswith("/"):
                copies[target] = sources[0]
        elif word == "USER":
            user = rest.strip()
        elif word == "WORKDIR":
            workdir = rest.strip()
        elif word == "ENTRYPOINT":
            entrypoint = _json_or_shell(rest)
        elif word == "CMD":
            cmd = _json_or_shell(rest)
        elif word == "HEALTHCHECK":
            healthcheck = _json_or_shell(rest.split(" CMD ", 1)[1])
    return Image(env, copies, user, workdir, entrypoint, cmd, healthcheck)


def load_compose(path: pathlib.Path = ROOT / "docker-compose.yml") -> dict:
    return yaml.safe_load(path.read_text())


def start_order(compose: dict) -> list[str]:
    """Services in depends_on order (dependencies first), ties in file order."""
    services = compose["services"]
    done: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in done:
            return
        assert name not in seen, f"depends_on cycle through {name}"
        depends = services[name].get("depends_on", {})
        for dependency in (depends if isinstance(depends, list) else list(depends)):
            visit(dependency, (*seen, name))
        done.append(name)

    for name in services:
        visit(name)
    return done


@dataclass
class PathMap:
    """Container paths -> host paths, longest first."""
    paths: dict[str, pathlib.Path] = field(default_factory=dict)

    def add(self, container: str, host: pathlib.Path) -> None:
        self.paths[container.rstrip("/")] = host

    def __call__(self, text: str) -> str:
        for container in sorted(self.paths, key=len, reverse=True):
            text = re.sub(rf"{re.escape(container)}(?=$|[/\s\"',\]:])", str(self.paths[container]), text)
        return text


def service_paths(compose: dict, name: str, image: Image, compose_dir: pathlib.Path,
                  volumes_dir: pathlib.Path, secrets_dir: pathlib.Path) -> PathMap:
    """The service's map; SECRETS_DIR becomes its /run/secrets (a link to each secret's file)."""
    service = compose["services"][name]
    mapping = PathMap()
    for container, source in image.copies.items():
        mapping.add(container, ROOT / source)
    for volume in service.get("volumes", []):
        source, container = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mapping.add(container, (compose_dir / source).resolve())
        else:
            host = volumes_dir / source
            host.mkdir(parents=True, exist_ok=True)
            mapping.add(container, host)
    for secret in service.get("secrets", []):
        secret_name = secret if isinstance(secret, str) else secret["source"]
        target = secret_name if isinstance(secret, str) else secret.get("target", secret_name)
        secrets_dir.mkdir(parents=True, exist_ok=True)
        (secrets_dir / target).symlink_to((compose_dir / compose["secrets"][secret_name]["file"]).resolve())
    mapping.add("/run/secrets", secrets_dir)
    return mapping
