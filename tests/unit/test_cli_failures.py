"""Every client command's errors end in one place (shared/cli.py main()): what it prints and
the exit code it gives."""
import grpc
import pytest

from shared.cli import CliFail, failure
from shared.errors import ConfigurationError, NotFound


class _StatusOnly(grpc.RpcError, grpc.Call):
    """An RPC error carrying only a status, as when the server cannot be reached."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "failed to connect"

    def trailing_metadata(self):
        return ()

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def cli_failure(exc: BaseException) -> CliFail:
    fail = failure(exc)
    assert fail is not None, f"{exc!r} was left to its traceback"
    return fail


def test_bad_usage_exits_2_with_its_message():
    fail = cli_failure(CliFail("duration '5x': expected ...", 2))
    assert (fail.message, fail.code) == ("duration '5x': expected ...", 2)


def test_missing_client_settings_exit_2_with_the_message_alone():
    fail = cli_failure(ConfigurationError("no client certificate: give --tls-dir DIR"))
    assert (fail.message, fail.code) == ("no client certificate: give --tls-dir DIR", 2)


def test_server_errors_exit_1_with_reason_and_message():
    fail = cli_failure(NotFound("no card 'x'"))
    assert (fail.message, fail.code) == ("NOT_FOUND: no card 'x'", 1)
    fail = cli_failure(_StatusOnly())
    assert fail.code == 1 and fail.message.startswith("UNAVAILABLE: ") and "failed to connect" in fail.message


@pytest.mark.parametrize("bug", [ValueError("x"), KeyError("y")])
def test_anything_else_is_a_bug_left_to_its_traceback(bug):
    assert failure(bug) is None
