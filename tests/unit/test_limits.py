"""shared/limits.py: the size limits of requests, durations, List pages and watch backlogs,
and shared/errors.py `quoted`: no error message echoes unbounded input."""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.cli.certificates import duration
from shared import config, convert, limits
from shared.cards import ApduResponse
from shared.cli import CliFail
from shared.errors import InvalidArgument, PinAttemptsThrottled, UnexpectedStatusWord, WatcherTooSlow, quoted
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import common_pb2, link_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import process_service_pb2 as process_pb
from shared.proto import reader_pool_service_pb2 as pool_pb

_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_CHARS = st.characters(exclude_categories=_SURROGATES)     # protobuf strings are UTF-8: no lone surrogates
_TEXTS = st.text(_CHARS, max_size=50) | st.builds(lambda c, n: c * n, _CHARS, st.integers(0, 20_000))


def refusal(message, path: str = "") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        limits.check_message(message, path)
    return err.value


def test_limits_a_45_kb_hello_label_is_refused_naming_the_field_and_the_limit():
    err = refusal(link_pb2.GatewayHello(gateway_id="station-1", labels={"room": "x" * 45_000}), "hello")
    assert err.field == "hello.labels['room']" and err.limit == limits.MAX_NAME_CHARS
    assert "45000 characters" in err.message and len(err.message) < 200


def test_limits_a_hello_with_too_many_readers_or_labels_is_refused():
    readers = [common_pb2.Reader(reader_id=f"pkcs11:m:{i}") for i in range(limits.MAX_READERS_PER_GATEWAY + 1)]
    assert refusal(link_pb2.GatewayHello(gateway_id="g", readers=readers), "hello").field == "hello.readers"
    labels = {f"k{i}": "v" for i in range(limits.MAX_LABELS + 1)}
    assert refusal(link_pb2.GatewayHello(gateway_id="g", labels=labels), "hello").field == "hello.labels"
    long_key = refusal(link_pb2.GatewayHello(gateway_id="g", labels={"k" * 5000: "v"}), "hello")
    assert long_key.field == "hello.labels" and len(long_key.message) < 200


def test_limits_a_reader_name_in_a_hello_is_bounded_by_its_field_path():
    hello = link_pb2.GatewayHello(gateway_id="g", readers=[common_pb2.Reader(reader_id="r"),
                                                          common_pb2.Reader(reader_id="r2", name="n" * 300)])
    assert refusal(hello, "hello").field == "hello.readers[1].name"


def test_limits_a_2_5_mb_lease_holder_is_refused():
    err = refusal(lease_pb.AcquireLeaseRequest(holder="h" * 2_500_000))
    assert err.field == "holder" and err.limit == limits.MAX_NAME_CHARS and len(err.message) < 200


def test_limits_nested_fields_ids_tokens_and_secrets_have_their_own_limits():
    selector = pool_pb.ListReadersRequest(selector=pool_pb.ReaderSelector(gateway_id="g" * (limits.MAX_ID_CHARS + 1)))
    assert refusal(selector).field == "selector.gateway_id"
    assert refusal(pool_pb.ListReadersRequest(page_token="t" * 2000)).limit == limits.MAX_PAGE_TOKEN_CHARS
    start = process_pb.StartProcessRequest(process="p", secret_inputs={"pin": "9" * 300})
    err = refusal(start)
    assert err.field == "secret_inputs['pin']" and "9999" not in err.message      # the secret is not quoted
    inputs = process_pb.StartProcessRequest(process="p", inputs={"list": common_pb2.Value(list=common_pb2.ValueList(
        values=[common_pb2.Value(text="ok"), common_pb2.Value(text="y" * 5000)]))})
    assert refusal(inputs).field == "inputs['list'].list.values[1].text"


def test_limits_requests_at_the_limits_pass():
    labels = {f"{i:02d}".ljust(limits.MAX_LABEL_KEY_CHARS, "k"): "v" * limits.MAX_NAME_CHARS
              for i in range(limits.MAX_LABELS)}
    limits.check_message(lease_pb.AcquireLeaseRequest(holder="h" * limits.MAX_NAME_CHARS, request_id="r" * 128,
                                                      selector=pool_pb.ReaderSelector(labels=labels)))
    limits.check_message(link_pb2.GatewayHello(gateway_id="g", readers=[
        common_pb2.Reader(reader_id=f"r{i}", atr=b"\x3b" * 33) for i in range(limits.MAX_READERS_PER_GATEWAY)]))


def test_limits_a_gateway_error_carrying_long_apdu_responses_passes_the_link_check():
    responses = (*(ApduResponse(bytes(256), 0x9000) for _ in range(40)), ApduResponse(b"", 0x6A82))
    error = UnexpectedStatusWord("APDU 40 answered 6A82", index=40, sw=0x6A82, responses=responses)
    message = link_pb2.GatewayMessage(step_result=link_pb2.StepResult(command_id="c",
                                                                      outcome=convert.error_to_outcome(error)))
    limits.check_message(message)


@given(st.text(_CHARS, min_size=0, max_size=3 * limits.MAX_NAME_CHARS))
def test_limits_a_holder_passes_exactly_when_within_its_limit(holder):
    request = lease_pb.AcquireLeaseRequest(holder=holder)
    if len(holder) <= limits.MAX_NAME_CHARS:
        limits.check_message(request)
    else:
        assert refusal(request).field == "holder"


_FIELDS = st.sampled_from(["gateway_id", "site", "version"])


@given(_FIELDS, _TEXTS, st.dictionaries(_TEXTS, _TEXTS, max_size=40))
def test_limits_any_hello_passes_or_is_refused_with_a_bounded_message_naming_a_field(field, text, labels):
    hello = link_pb2.GatewayHello(labels=labels, **{field: text})
    try:
        limits.check_message(hello, "hello")
    except InvalidArgument as err:
        assert err.field is not None and err.field.startswith("hello.") and err.limit is not None
        assert len(err.message) < 300
    else:
        assert len(text) <= limits.text_limit(field) and len(labels) <= limits.MAX_LABELS
        assert all(len(k) <= limits.MAX_LABEL_KEY_CHARS and len(v) <= limits.MAX_NAME_CHARS
                   for k, v in labels.items())


def test_limits_a_huge_duration_is_invalid_argument_not_an_overflow():
    request = certificate_pb.SearchIssuedCertificatesRequest()
    request.older_than.seconds = 315_576_000_000          # the largest protobuf Duration: 10 000 years
    err = refusal(request)
    assert err.field == "older_than" and err.reason == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument):
        limits.check_days(4_000_000_000, "days")           # uint32 days: timedelta would overflow
    with pytest.raises(InvalidArgument):
        limits.check_duration(float("inf"), "ttl")
    assert limits.check_days(30, "days") == dt.timedelta(days=30)


def test_limits_older_than_and_configured_durations_past_the_limit_are_refused_not_overflowed():
    with pytest.raises(CliFail) as cli:
        duration("99999999999d")
    assert cli.value.code == 2 and "36525 days" in str(cli.value)
    assert duration("7d") == dt.timedelta(days=7)
    with pytest.raises(ValueError, match="the limit is"):
        config.duration_seconds("999999999d", "grace_period")
    with pytest.raises(ValueError, match="the limit is"):
        config.duration_seconds(float("inf"), "grace_period")
    assert config.duration_seconds("2d", "grace_period") == 172800.0


def test_errors_quoted_bounds_a_1_mb_input():
    text = quoted("x" * 1_000_000)
    assert len(text) < 120 and text.endswith("(1000000 characters)")
    assert quoted("short") == "'short'"


def test_limits_pages_stop_at_the_byte_budget_and_always_hold_one_item():
    assert limits.page_fits([100] * 10) == 10
    big = limits.MAX_PAGE_BYTES // 4
    assert limits.page_fits([big] * 10) == 3
    assert limits.page_fits([limits.MAX_PAGE_BYTES * 2, 1]) == 1


def test_limits_a_backlog_drops_a_slow_watcher_with_how_far_behind_it_is():
    async def body():
        backlog: limits.Backlog[int] = limits.Backlog(limit=3)
        for i in range(5):
            backlog.put(i)
        with pytest.raises(WatcherTooSlow) as err:
            await backlog.get()
        fast: limits.Backlog[int] = limits.Backlog(limit=3)
        got = []
        for i in range(10):
            fast.put(i)
            got.append(await fast.get())
        return err.value, got

    err, got = asyncio.run(body())
    assert err.code == "RESOURCE_EXHAUSTED" and err.behind == 5 and "watcher too slow: 5 events behind" in err.message
    assert got == list(range(10))


def test_errors_pin_family_carries_attempts_remaining():
    err = PinAttemptsThrottled("wait", retry_after_ms=1000, failures=2, attempts_remaining=1)
    assert err.code == "RESOURCE_EXHAUSTED" and err.to_details()["attempts_remaining"] == 1
