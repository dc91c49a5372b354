"""Runs the shell blocks of the project's docs as written: the commands of a ```sh block,
each through bash, with a fixed substitution table for addresses and the working directory
(the only edits). A command ending in `&` is started in the background (its own process
group, stopped by close()); `export`s carry over to the next commands."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[2]


def section(markdown: str, heading: str) -> str:
    """The text under HEADING (a whole '## ...' line) up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    rest = markdown[markdown.index(heading + "\n") + len(heading) + 1:]
    following = re.search(rf"^{re.escape(level)} ", rest, re.M)
    return rest[:following.start()] if following else rest


def sh_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", markdown, re.S | re.M)


def commands(block: str) -> list[str]:
    """One entry per command: continuation lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def substitute(command: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        command = command.replace(old, new)
    return command


@dataclass
class ShellSession:
    cwd: pathlib.Path
    env: dict[str, str]
    log_dir: pathlib.Path
    background: list[subprocess.Popen] = field(default_factory=list)

    def run(self, command: str, *, stdin: str = "", timeout: float = 240) -> subprocess.CompletedProcess:
        stripped = command.rstrip()
        if stripped.endswith("&") and not stripped.endswith("&&"):
            return self._start(stripped[:-1])
        env_file = self.log_dir / "session.env"
        script = f"{command}\nstatus=$?\nenv -0 > {env_file}\nexit $status\n"
        # A session of its own: no controlling terminal, so hidden prompts read standard input.
        done = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, input=stdin, text=True,
                              capture_output=True, timeout=timeout, start_new_session=True)
        if env_file.exists():
            pairs = env_file.read_bytes().split(b"\0")
            self.env = dict(p.decode().split("=", 1) for p in pairs if b"=" in p)
            env_file.unlink()
        return done

    def _start(self, command: str) -> subprocess.CompletedProcess:
        log = self.log_dir / f"background-{len(self.background)}.log"
        with open(log, "w") as out:
            self.background.append(subprocess.Popen(["bash", "-c", command], cwd=self.cwd, env=self.env,
                                                    stdout=out, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True))
        return subprocess.CompletedProcess(command, 0, "", "")

    def background_output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}"
                         for log in sorted(self.log_dir.glob("background-*.log")))

    def close(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.background:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


#: Words in the paragraph before a ```sh block that keep the tests from running it.
NOT_RUN = "not run by the tests"


def runnable_sh_blocks(markdown: str) -> list[str]:
    """The ```sh blocks whose preceding text does not say NOT_RUN."""
    found = []
    for match in re.finditer(r"^```sh\n(.*?)^```", markdown, re.S | re.M):
        before = markdown[:match.start()].rsplit("```", 1)[-1]
        paragraph = " ".join(before.rstrip().rsplit("\n\n", 1)[-1].split())
        if NOT_RUN not in paragraph:
            found.append(match.group(1))
    return found


def run_block_commands(session: ShellSession, blocks: list[str], table: Mapping[str, str],
                       answers: Mapping[str, str] = {}) -> list[str]:
    """Runs every command of BLOCKS; fails with its output and the servers' when one fails.
    ANSWERS: standard input of the commands containing a key (hidden prompts)."""
    outputs = []
    for command in [c for block in blocks for c in commands(block)]:
        stdin = next((answer for word, answer in answers.items() if word in command), "")
        done = session.run(substitute(command, table), stdin=stdin)
        outputs.append(done.stdout)
        assert done.returncode == 0, (f"documented command failed ({done.returncode}): {command}\n"
                                      f"{done.stdout}\n{done.stderr}\n{session.background_output()}")
    return outputs
