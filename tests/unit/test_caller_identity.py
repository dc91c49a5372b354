"""How cardline names a caller (shared/tls.py actor_of): one rendering for audit rows, logs
and lease owners. Audit rows already stored carry this text, so its form is pinned here.
`calling_as` runs code as a caller in-process, as the authorising interceptor does."""
from __future__ import annotations

import asyncio

from gateway.core.executor import LinkCaller, caller_shown
from orchestrator.services.auditing import ORCHESTRATOR_ACTOR, acting
from orchestrator.services.leases import identity_of
from shared.tls import LOCAL_ACTOR, PeerIdentity, actor_of, calling_as, current_actor, current_caller

BILLING = PeerIdentity("service", "billing-svc", 0x5E)


def test_caller_is_named_by_role_name_and_hex_serial_as_stored_audit_rows_are():
    assert actor_of(BILLING) == BILLING.actor == "service:billing-svc#5e"
    assert actor_of(PeerIdentity(None, "odd", 255)) == "none:odd#ff"


def test_lease_owner_is_the_caller_without_its_serial_so_a_renewed_certificate_keeps_its_leases():
    assert identity_of(BILLING) == actor_of(BILLING, serial=False) == "service:billing-svc"
    assert identity_of(PeerIdentity("service", "billing-svc", 0x99)) == identity_of(BILLING)


def test_no_certificate_is_local_unless_the_orchestrator_acts_by_itself():
    assert actor_of(None) == current_actor() == identity_of(None) == caller_shown(None) == LOCAL_ACTOR
    assert acting() == ORCHESTRATOR_ACTOR and acting("card_task") == "card_task"


def test_gateway_logs_name_a_direct_caller_as_the_audit_does_and_the_link_as_the_link():
    assert caller_shown(BILLING) == "service:billing-svc#5e"
    assert caller_shown(LinkCaller("orch.example:7443")) == "link:orch.example:7443"


def test_code_run_calling_as_a_caller_is_named_by_it_everywhere_and_only_inside_the_block():
    with calling_as(BILLING):
        assert current_caller() == BILLING
        assert current_actor() == acting() == acting("card_task") == "service:billing-svc#5e"
    assert current_caller() is None and acting() == ORCHESTRATOR_ACTOR


def test_calling_as_holds_across_awaits_and_for_tasks_started_inside_but_not_for_other_tasks():
    async def body():
        async def named() -> str:
            await asyncio.sleep(0)
            return current_actor()
        with calling_as(BILLING):
            started_inside = asyncio.create_task(named())
            awaited = await named()
        started_after = asyncio.create_task(named())
        return awaited, await started_inside, await started_after

    assert asyncio.run(body()) == ("service:billing-svc#5e", "service:billing-svc#5e", LOCAL_ACTOR)
