"""Rule C16 at the `openssl ca` connector: OpenSslCa opens, and repairs, every directory an
`openssl ca` run can leave when it is killed at any instruction - missing index.txt, `.new`
files with or without `.old`, a serial file ahead of (or behind) the index, a newcerts/ file
without its index line - and says what it repaired; an OSError while checking is a clear
CaUnavailable.

The states are made by the real openssl: each run is killed by strace's syscall fault
injection (`-e inject=...:signal=KILL`) before its n-th openat, write or rename, for every n
until the run completes; the directory is then opened again, as by a restarted
orchestrator, and checked against what openssl itself keeps."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import stat

import pytest
from cryptography import x509

from orchestrator.ca import IssueProfile
from orchestrator.ca.openssl import OpenSslCa
from orchestrator.services.reconciler import Reconciler
from orchestrator.store import CaRequestState, Store
from shared.errors import CaRefused, CaUnavailable
from tests.integration.test_openssl_ca import AUTH, make_csr

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (syscall fault injection)")

ISSUED = "Issued"
KILLABLE = ("openat", "write", "rename")


def _killing_openssl(tmp_path: pathlib.Path, syscall: str, when: int, only: str) -> str:
    """An `openssl` that runs the real one under strace, SIGKILLed before its `when`-th
    `syscall`, for the `openssl ca` runs whose arguments contain `only`."""
    script = tmp_path / f"openssl-killed-at-{syscall}-{when}"
    real = shutil.which("openssl")
    script.write_text(f"""#!/bin/sh
case "$* " in
  "ca -batch "*" {only} "*) exec strace -f -qq -o /dev/null -e trace={syscall} \\
        -e inject={syscall}:error=EIO:signal=KILL:when={when} {real} "$@" ;;
esac
exec {real} "$@"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def issued_to(cn: str) -> IssueProfile:
    """AUTH for a certificate whose subject is CN=<cn> (the CA issues the profile's subject)."""
    return dataclasses.replace(AUTH, subject=f"CN={cn}")


def _index(d: pathlib.Path) -> list[list[str]]:
    return [line.split("\t") for line in (d / "index.txt").read_text().splitlines()]


def _assert_consistent(d: pathlib.Path) -> list[list[str]]:
    """What openssl itself keeps: no leftovers, every newcerts file listed, serial past all."""
    assert not [p.name for p in d.iterdir() if p.name.endswith(".new")], sorted(os.listdir(d))
    lines = _index(d)
    serials = {line[3] for line in lines}
    assert {p.stem for p in (d / "newcerts").glob("*.pem")} == serials
    assert int((d / "serial").read_text(), 16) > max(int(s, 16) for s in serials)
    assert (d / "index.txt.attr").read_text() == "unique_subject = no\n"
    return lines


@pytest.fixture
def ca_dir(tmp_path) -> pathlib.Path:
    """A CA made by the connector with one certificate issued through it."""
    ca = OpenSslCa(tmp_path / "base", name="crash")
    ca.issue(make_csr(), issued_to("First"), "req-first")
    return tmp_path / "base"


def _copy(ca_dir: pathlib.Path, where: pathlib.Path) -> pathlib.Path:
    shutil.copytree(ca_dir, where, symlinks=True)
    return where


# -- the reproduction of the issue and the single states ------------------------------------

def test_c16_index_moved_to_new_between_the_renames_is_completed(ca_dir):
    """The issue's reproduction: killed between index.txt -> .old and .new -> index.txt."""
    lines_before = _index(ca_dir)
    os.replace(ca_dir / "index.txt", ca_dir / "index.txt.new")
    shutil.copy(ca_dir / "index.txt.attr", ca_dir / "index.txt.attr.new")
    reopened = OpenSslCa(ca_dir, name="crash")
    assert any("index.txt.new became index.txt" in r for r in reopened.repairs), reopened.repairs
    assert _assert_consistent(ca_dir) == lines_before
    assert reopened.find_issued("req-first") is not None


@pytest.mark.parametrize("old", [True, False], ids=["with-old", "without-old"])
def test_c16_new_files_of_a_complete_run_are_rolled_forward(tmp_path, ca_dir, old):
    ca = OpenSslCa(ca_dir, name="crash")
    before = {n: (ca_dir / n).read_bytes() for n in ("index.txt", "serial")}
    der = ca.issue(make_csr(), issued_to("Second"), "req-second")
    for name, content in before.items():            # the state before the renames
        os.replace(ca_dir / name, ca_dir / f"{name}.new")
        (ca_dir / name).write_bytes(content)
    if not old:
        for name in ("index.txt.old", "serial.old", "index.txt.attr.old"):
            (ca_dir / name).unlink(missing_ok=True)
    for journal in (ca_dir / "requests").glob("*.json"):
        journal.unlink()
    reopened = OpenSslCa(ca_dir, name="crash")
    assert len(_assert_consistent(ca_dir)) == 2
    assert reopened.find_issued("req-second") == der             # found by its request tag
    assert reopened.repairs


def test_c16_missing_index_is_restored_from_old_and_newcerts(ca_dir):
    ca = OpenSslCa(ca_dir, name="crash")
    ca.issue(make_csr(), issued_to("Second"), "req-second")
    (ca_dir / "index.txt").unlink()                 # .old holds the first line only
    reopened = OpenSslCa(ca_dir, name="crash")
    assert any("restored from index.txt.old" in r for r in reopened.repairs)
    assert any("had no index line" in r for r in reopened.repairs)
    assert len(_assert_consistent(ca_dir)) == 2
    assert reopened.find_issued("req-second") is not None


def test_c16_missing_index_without_any_copy_is_a_clear_error_not_an_empty_ca(ca_dir):
    for name in ("index.txt", "index.txt.old"):
        (ca_dir / name).unlink(missing_ok=True)
    with pytest.raises(CaUnavailable, match=r"index\.txt is missing"):
        OpenSslCa(ca_dir, name="crash")
    assert not (ca_dir / "index.txt").exists()      # nothing half-written


def test_c16_serial_behind_the_index_is_moved_past_it_and_ahead_is_kept(ca_dir):
    used = int(_index(ca_dir)[0][3], 16)
    (ca_dir / "serial").write_text(f"{used:X}\n")
    reopened = OpenSslCa(ca_dir, name="crash")
    assert any("serial was behind" in r for r in reopened.repairs)
    assert int((ca_dir / "serial").read_text(), 16) == used + 1
    (ca_dir / "serial").write_text(f"{used + 10:X}\n")
    again = OpenSslCa(ca_dir, name="crash")
    assert again.repairs == []
    assert x509.load_der_x509_certificate(again.issue(make_csr(), AUTH, "req-x")).serial_number == used + 10


def test_c16_newcerts_file_without_index_line_is_recorded_or_set_aside(ca_dir):
    ca = OpenSslCa(ca_dir, name="crash")
    index_before = (ca_dir / "index.txt").read_bytes()
    der = ca.issue(make_csr(), issued_to("Orphan"), "req-orphan")
    (ca_dir / "index.txt").write_bytes(index_before)
    for journal in (ca_dir / "requests").glob("*.json"):
        journal.unlink()
    (ca_dir / "newcerts" / "0BADC0DE.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB")   # cut short
    reopened = OpenSslCa(ca_dir, name="crash")
    assert len(_assert_consistent(ca_dir)) == 2
    assert reopened.find_issued("req-orphan") == der
    assert [p.name.split(".")[0] for p in (ca_dir / "discarded").iterdir()] == ["0BADC0DE"]
    orphan_line = _index(ca_dir)[1]
    assert orphan_line[0] == "V" and orphan_line[5] == "/CN=Orphan"


def test_c16_os_error_while_checking_is_ca_unavailable(ca_dir):
    (ca_dir / "index.txt.new").mkdir()             # unreadable as a file: IsADirectoryError
    with pytest.raises(CaUnavailable, match="cannot check") as caught:
        OpenSslCa(ca_dir, name="crash")
    assert "index.txt.new" in caught.value.message


# -- every syscall of a real run: killed before each one ------------------------------------

def _kill_every_syscall(tmp_path, ca_dir, only: str, run) -> tuple[int, int]:
    """run(ca) on a copy of ca_dir with openssl killed before its n-th openat, write or
    rename, for n = 1, 2, ... until a run completes; after each kill reopen (the restart),
    check, and run again. (kills, runs rolled forward)."""
    kills = forward = 0
    for syscall in KILLABLE:
        for when in range(1, 400):
            d = _copy(ca_dir, tmp_path / f"kill-{only.strip('-')}-{syscall}-{when}")
            ca = OpenSslCa(d, name="crash", openssl=_killing_openssl(tmp_path, syscall, when, only))
            try:
                run(ca)
            except (CaRefused, CaUnavailable):
                kills += 1
            else:
                shutil.rmtree(d)
                break
            reopened = OpenSslCa(d, name="crash")             # the restart
            _assert_consistent(d)
            forward += any(r.startswith("completed") for r in reopened.repairs)
            run(reopened)                                     # and the retry works
            _assert_consistent(d)
            shutil.rmtree(d)
        else:
            raise AssertionError(f"the openssl run never completed ({syscall})")
    return kills, forward


@needs_strace
def test_c16_issuance_killed_before_every_file_syscall_loses_no_certificate(tmp_path, ca_dir):
    csr = make_csr(cn="Killed")
    issued: list[bytes] = []

    def issue(ca: OpenSslCa) -> bytes:
        der = ca.issue(csr, issued_to("Killed"), "req-killed")
        issued.append(der)
        assert ca.find_issued("req-killed") == der
        # the same request never gets a second certificate
        assert sum(line[5].endswith("CN=Killed") for line in _index(ca.directory)) == 1
        return der

    kills, forward = _kill_every_syscall(tmp_path, ca_dir, "-in", issue)
    # after the newcerts write every kill (5 renames, the last write) is rolled forward
    assert kills >= 20 and forward >= 5, (kills, forward)


@needs_strace
def test_c16_revocation_killed_before_every_file_syscall_is_all_or_nothing(tmp_path, ca_dir):
    serial = int(_index(ca_dir)[0][3], 16)

    def revoke(ca: OpenSslCa) -> None:
        ca.revoke(serial, "keyCompromise")
        [line] = _index(ca.directory)
        assert line[0] == "R" and "keyCompromise" in line[2]

    kills, forward = _kill_every_syscall(tmp_path, ca_dir, "-revoke", revoke)
    assert kills >= 5 and forward >= 3, (kills, forward)


# -- after the restart the reconciler stores the certificate by its request tag -------------

def test_c16_reconciler_stores_the_certificate_of_the_interrupted_run_by_its_tag(store: Store, ca_dir):
    task = store.tasks.create("card_production", "gw1", "r1", owner="orchestrator-test-me")
    store.cards.create(task.id, "0815", "EmployeeCard", "InProduction", "gw1", "r1")
    rid = f"{task.id}:2:Application_1"
    csr = make_csr(cn="Interrupted")
    store.ca_requests.journal(rid, task.id, "crash", "EmployeeAuthentication", csr)
    ca = OpenSslCa(ca_dir, name="crash")
    der = ca.issue(csr, issued_to("Interrupted"), rid)
    for journal in (ca_dir / "requests").glob("*.json"):     # killed before the connector's journal
        journal.unlink()
    os.replace(ca_dir / "index.txt", ca_dir / "index.txt.new")   # ... and inside openssl's renames
    shutil.copy(ca_dir / "index.txt.attr", ca_dir / "index.txt.attr.new")
    del ca

    restarted = OpenSslCa(ca_dir, name="crash")
    report = Reconciler(store, {"crash": restarted}, ISSUED, owner_id="orchestrator-test-me",
                        card_failed_state=lambda template: "ProductionFailed").reconcile_once()
    assert report.stored == 1
    row = store.ca_requests.get(rid)
    assert row.state == CaRequestState.STORED
    [cert] = store.certificates.list(task_id=task.id)
    assert cert.der == der and cert.id == row.certificate_id


def test_c16_a_crl_run_killed_between_its_renames_needs_no_operator(ca_dir):
    ca = OpenSslCa(ca_dir, name="crash")
    ca.crl_der()
    number = (ca_dir / "crlnumber").read_text()
    (ca_dir / "crlnumber.new").write_text("10")                 # cut short
    os.replace(ca_dir / "crlnumber", ca_dir / "crlnumber.old")   # and between the renames
    reopened = OpenSslCa(ca_dir, name="crash")
    assert (ca_dir / "crlnumber").exists() and not (ca_dir / "crlnumber.new").exists()
    assert int((ca_dir / "crlnumber").read_text(), 16) > int(number, 16) - 1
    crl = x509.load_der_x509_crl(reopened.crl_der())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= int(number, 16)
