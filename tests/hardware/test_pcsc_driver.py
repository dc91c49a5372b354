"""PyscardDriver through pyscard -> a private pcscd -> vpcd -> our card emulator."""
from __future__ import annotations

import threading
import time

import pytest

from gateway.drivers.base import Apdu
from gateway.drivers.pcsc import PyscardDriver, check_command_apdu
from shared.errors import (
    CardRemoved,
    InvalidArgument,
    MalformedApdu,
    NoCardPresent,
    ReaderBusy,
    ReaderNotFound,
    UnexpectedStatusWord,
)
from tests.support.pcsc import wait_card_state
from tests.support.vpcd_card import APP_AID, ATR, BIG_OBJECT, SERIAL

pytestmark = pytest.mark.hardware

SELECT = Apdu(bytes.fromhex("00A4040C") + bytes([len(APP_AID)]) + APP_AID)
VERIFY_OK = Apdu(bytes.fromhex("0020008106") + b"123456")


@pytest.fixture
def driver(pcscd):
    d = PyscardDriver()
    yield d
    d.close()


def test_list_readers_shows_both_vpcd_slots_and_the_inserted_card(driver, pcscd, virtual_card):
    readers = {r.name: r for r in driver.list_readers()}
    assert set(readers) == {pcscd.reader_name(0), pcscd.reader_name(1)}
    slot0 = readers[virtual_card.reader]
    assert slot0.reader_id == "pcsc:" + virtual_card.reader
    assert slot0.card_present and slot0.atr == ATR
    assert not readers[pcscd.reader_name(1)].card_present


def test_wait_for_events_reports_readers_then_insert_and_remove(driver, pcscd, vpcd_card_factory):
    first = driver.wait_for_events(0)          # the first call reports what is there
    assert {(e.kind, e.reader.name) for e in first} >= {
        ("reader_added", pcscd.reader_name(0)), ("reader_added", pcscd.reader_name(1))}
    assert driver.wait_for_events(0.2) == []

    card = vpcd_card_factory(1, insert=False)
    card.insert()
    events = driver.wait_for_events(5)
    assert [(e.kind, e.reader.reader_id) for e in events] == [
        ("inserted", "pcsc:" + pcscd.reader_name(1))]
    assert events[0].reader.atr == ATR

    card.remove()
    events = driver.wait_for_events(5)
    assert [(e.kind, e.reader.name) for e in events] == [("removed", pcscd.reader_name(1))]


def test_script_selects_reads_updates_and_follows_61xx_and_6cxx(driver, virtual_card):
    payload = bytes(range(200))
    script = [
        SELECT,
        VERIFY_OK,
        Apdu(bytes.fromhex("00D60100") + bytes([len(payload)]) + payload),     # UPDATE @256
        Apdu(bytes.fromhex("00B00100C8")),                                    # READ 200 @256
        Apdu(bytes.fromhex("00B0000010")),                                    # READ 16 @0
        Apdu(bytes.fromhex("00B00800000200")),          # extended Le 512 @2048 (> 256 bytes)
        Apdu(bytes.fromhex("00CA005A")),                # 6C08 -> resent with Le=08
        Apdu(bytes.fromhex("00CA7F2100")),              # 61xx chain -> 700 bytes
    ]
    responses = driver.run_script(virtual_card.reader_id, script)
    assert [r.sw for r in responses] == [0x9000] * len(script)
    assert responses[3].data == payload
    assert responses[4].data == b"cardline-ef-0001"
    assert responses[5].data == bytes(512)
    assert responses[6].data == SERIAL
    assert responses[7].data == BIG_OBJECT
    sent = virtual_card.card.apdus
    assert bytes.fromhex("00CA005A08") in sent                               # the 6Cxx resend
    assert sum(a[:2] == b"\x00\xC0" for a in sent) == 3                      # 256+256+188


def test_run_script_accepts_bare_reader_name(driver, virtual_card):
    assert driver.run_script(virtual_card.reader, [SELECT])[0].sw == 0x9000


def test_expected_sw_patterns_with_wildcards_accept_warnings_and_counters(driver, virtual_card):
    script = [
        SELECT,
        Apdu(bytes.fromhex("0020008106") + b"000000", expected_sw=("63CX",)),  # wrong PIN
        Apdu(bytes.fromhex("00B00FF020"), expected_sw=("9000", "62XX")),      # short read
        Apdu(bytes.fromhex("00CA7F2100"), expected_sw=("61XX",)),             # raw 61xx
        Apdu(bytes.fromhex("00CA005A"), expected_sw=("6CXX",)),               # raw 6Cxx
        Apdu(bytes.fromhex("00200081"), expected_sw=()),                      # anything
    ]
    responses = driver.run_script(virtual_card.reader_id, script)
    assert [r.sw for r in responses] == [0x9000, 0x63C2, 0x6282, 0x6100, 0x6C08, 0x63C2]
    assert len(responses[2].data) == 16


def test_unexpected_sw_stops_the_script_with_index_and_sw(driver, virtual_card):
    virtual_card.card.reset_count()
    script = [SELECT,
              Apdu(bytes.fromhex("00A4040C03A00000")),          # unknown AID -> 6A82
              Apdu(bytes.fromhex("00B0000010"))]
    with pytest.raises(UnexpectedStatusWord) as info:
        driver.run_script(virtual_card.reader_id, script)
    assert info.value.index == 1
    assert info.value.sw == 0x6A82
    assert [r.sw for r in info.value.responses] == [0x9000, 0x6A82]
    assert virtual_card.card.apdu_count == 2                    # the third was never sent


def test_card_status_words_for_pin_tries_wrong_cla_and_unknown_ins(driver, virtual_card):
    wrong = Apdu(bytes.fromhex("0020008106") + b"999999", expected_sw=("63CX", "6983"))
    responses = driver.run_script(virtual_card.reader_id, [
        SELECT, wrong, wrong, wrong, wrong,
        Apdu(bytes.fromhex("80CA005A08"), expected_sw=("6E00",)),
        Apdu(bytes.fromhex("0012000000"), expected_sw=("6D00",)),
    ])
    assert [r.sw for r in responses[1:5]] == [0x63C2, 0x63C1, 0x6983, 0x6983]


@pytest.mark.parametrize("hex_apdu", [
    "00A4",                       # shorter than a header
    "00A4040C05A000",             # Lc=5, 2 data bytes
    "00A4040C02A0000000",         # Lc=2, 3 bytes after the data
    "00B000000001",               # 00 then one byte: neither short nor extended
    "00D6000000000003AABB",       # extended Lc=3, 2 data bytes
])
def test_malformed_apdu_is_rejected_before_anything_is_sent(driver, virtual_card, hex_apdu):
    virtual_card.card.reset_count()
    with pytest.raises(MalformedApdu) as info:
        driver.run_script(virtual_card.reader_id, [SELECT, Apdu(bytes.fromhex(hex_apdu))])
    assert info.value.metadata["index"] == "1"
    assert "APDU 1" in info.value.message
    assert virtual_card.card.apdu_count == 0


def test_bad_expected_sw_pattern_is_rejected_before_anything_is_sent(driver, virtual_card):
    virtual_card.card.reset_count()
    with pytest.raises(InvalidArgument):
        driver.run_script(virtual_card.reader_id, [Apdu(SELECT.command, ("90",))])
    assert virtual_card.card.apdu_count == 0


def test_apdu_structure_checker_knows_all_iso_cases():
    ok = ["00A40400", "00B0000010", "00A4040C02A000", "00A4040002A00000",
          "00B0000000FFFF", "00D600000000023F00", "00D60000000001120000"]
    bad = ["00A404", "00A4040C02A0", "00B000000001", "00D6000000000000", "00D600000000023F",
           "0060000000"]
    assert [check_command_apdu(bytes.fromhex(a)) for a in ok] == [None] * len(ok)
    assert all(check_command_apdu(bytes.fromhex(a)) for a in bad)


def test_unknown_reader_raises_reader_not_found(driver, pcscd):
    with pytest.raises(ReaderNotFound):
        driver.run_script("pcsc:No Such Reader 00 00", [SELECT])


def test_empty_reader_raises_no_card_present(driver, pcscd):
    with pytest.raises(NoCardPresent):
        driver.run_script("pcsc:" + pcscd.reader_name(1), [SELECT])


def test_card_pulled_mid_script_raises_card_removed(driver, virtual_card):
    virtual_card.card.drop_after(2)                  # SELECT, READ answered; then gone
    script = [SELECT, Apdu(bytes.fromhex("00B0000010")), Apdu(bytes.fromhex("00B0001010")),
              Apdu(bytes.fromhex("00B0002010"))]
    with pytest.raises(CardRemoved) as info:
        driver.run_script(virtual_card.reader_id, script)
    assert info.value.metadata["index"] == "2"


def test_scripts_run_concurrently_on_two_readers(driver, pcscd, vpcd_card_factory):
    cards = [vpcd_card_factory(0), vpcd_card_factory(1)]
    script = [SELECT] + [Apdu(bytes.fromhex("00B0000010"))] * 200
    results, errors = {}, []

    def run(slot):
        try:
            results[slot] = driver.run_script(pcscd.reader_name(slot), script)
        except Exception as exc:       # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert all(len(results[s]) == 201 for s in (0, 1))
    assert [c.apdu_count for c in cards] == [201, 201]


def test_same_driver_works_again_after_pcscd_restart(driver, pcscd, restart_pcscd,
                                                     vpcd_card_factory):
    card = vpcd_card_factory(0)
    assert driver.run_script(pcscd.reader_name(0), [SELECT])[0].sw == 0x9000
    driver.wait_for_events(0)
    old_pid = pcscd.pid

    restart_pcscd()
    assert pcscd.pid != old_pid
    card.remove()                      # vpcd dropped it with the old pcscd; plug in again
    card.insert()
    wait_card_state(pcscd.reader_name(0), present=True)

    assert [r.name for r in driver.list_readers()] == [pcscd.reader_name(0),
                                                       pcscd.reader_name(1)]
    responses = driver.run_script(pcscd.reader_name(0),
                                  [SELECT, Apdu(bytes.fromhex("00B0000010"))])
    assert responses[1].data == b"cardline-ef-0001"
    # The event watcher recovers too, and still sees card changes afterwards.
    driver.wait_for_events(0)
    card.remove()
    deadline = time.monotonic() + 5
    kinds = []
    while "removed" not in kinds and time.monotonic() < deadline:
        kinds += [e.kind for e in driver.wait_for_events(1)]
    assert "removed" in kinds


def test_apdu_round_trip_latency_through_the_emulator(driver, virtual_card, record_property):
    """Not a pass/fail benchmark: proves the QUICKACK fix (no ~40 ms stalls) and reports p50."""
    n = 300
    script = [SELECT] + [Apdu(bytes.fromhex("00B0000010"))] * n
    t0 = time.perf_counter()
    driver.run_script(virtual_card.reader_id, script)
    per_apdu_ms = (time.perf_counter() - t0) * 1000 / (n + 1)
    record_property("apdu_ms", per_apdu_ms)
    assert per_apdu_ms < 5, f"{per_apdu_ms:.2f} ms per APDU: delayed-ACK stalls?"


def test_card_held_exclusively_elsewhere_raises_reader_busy(driver, virtual_card):
    from smartcard import scard
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    hresult, hcard, _ = scard.SCardConnect(context, virtual_card.reader,
                                           scard.SCARD_SHARE_EXCLUSIVE, scard.SCARD_PROTOCOL_T1)
    assert hresult == scard.SCARD_S_SUCCESS
    try:
        with pytest.raises(ReaderBusy):
            driver.run_script(virtual_card.reader_id, [SELECT])
    finally:
        scard.SCardDisconnect(hcard, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(context)
    assert driver.run_script(virtual_card.reader_id, [SELECT])[0].sw == 0x9000
