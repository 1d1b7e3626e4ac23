"""Seed 002's money transfer on the same engine: debit one account (undone by a refund),
then credit another (the pivot: never undone, retried until it lands). Money is exact,
never negative, and conserved."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import in_background, join
from launcher import wait_for

OPENING = {"A": 1000, "B": 500, "C": 250}


def test_seed_call_moves_100_from_a_to_b(live_system):
    resp = live_system.transfer({"amount": 100})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "COMPLETED" and body["type"] == "transfer"
    assert live_system.balances() == {"A": 900, "B": 600, "C": 250}
    accounts = live_system.get("/accounts").json()
    assert accounts == {"accounts": [{"id": "A", "service": "A", "balance": "900.00"},
                                     {"id": "B", "service": "B", "balance": "600.00"},
                                     {"id": "C", "service": "C", "balance": "250.00"}],
                        "total": "1750.00", "in_flight": "0.00", "complete": True}
    assert live_system.calls(body["saga"]) == [("A", "invoke", 1, "success"),
                                               ("B", "invoke", 1, "success")]


def test_transfer_between_named_accounts_with_a_decimal_string(live_system):
    resp = live_system.transfer({"from": "B", "to": "C", "amount": "12.50"})
    assert resp.status_code == 200, resp.text
    assert live_system.balances() == {"A": 1000, "B": 487.5, "C": 262.5}
    assert live_system.get("/accounts").json()["total"] == "1750.00"


def test_each_service_answers_its_own_balance(live_system):
    live_system.transfer({"amount": "0.01"})
    for service, balance in (("A", "999.99"), ("B", "500.01"), ("C", "250.00")):
        got = live_system.get_service(service, "/balance")
        assert got == {"account": service, "balance": balance}


BAD = [
    ({"amount": 0}, "amount", "more than 0"),
    ({"amount": -5}, "amount", "more than 0"),
    ({"amount": "-5"}, "amount", "decimal"),
    ({"amount": 1.234}, "amount", "two decimal places"),
    ({"amount": "1.234"}, "amount", "two decimal places"),
    ({"amount": "ten"}, "amount", "decimal"),
    ({"amount": "1e3"}, "amount", "decimal"),
    ({"amount": True}, "amount", "must be a number"),
    ({"amount": None}, "amount", "required"),
    ({}, "amount", "required"),
    ({"amount": [5]}, "amount", "must be a number"),
    ({"amount": 1000000.01}, "amount", "at most 1000000"),
    ({"amount": 10 ** 30}, "amount", "at most 1000000"),
    ({"amount": 5, "from": "A", "to": "A"}, "to", "another account"),
    ({"amount": 5, "from": "D"}, "from", "must be one of A, B, C"),
    ({"amount": 5, "to": "a"}, "to", "must be one of A, B, C"),
    ({"amount": 5, "to": 2}, "to", "must be one of A, B, C"),
    ({"amount": 5, "currency": "EUR"}, "currency", "unknown field"),
]


@pytest.mark.parametrize("body, field, problem", BAD, ids=[str(b) for b, _, _ in BAD])
def test_bad_transfer_is_400_naming_the_field_and_moves_nothing(live_system, body, field,
                                                                 problem):
    resp = live_system.transfer(body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field and problem in resp.json()["error"], resp.json()
    assert live_system.balances() == OPENING
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 0


def test_insufficient_funds_is_409_with_a_reason_and_moves_nothing(live_system):
    resp = live_system.transfer({"from": "C", "to": "A", "amount": "250.01"})
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == "debit"
    assert "insufficient funds" in body["reason"]
    assert live_system.balances() == OPENING
    # The debit wrote nothing, so there is nothing to refund and no credit was sent.
    assert live_system.calls(body["saga"]) == [("C", "invoke", 1, "rejected")]


def test_concurrent_debits_never_overdraw_an_account(live_system):
    # 16 clients each take 100 from C, which holds 250: exactly two may succeed.
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: live_system.transfer(
            {"from": "C", "to": "A", "amount": 100}), range(16)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 2 + [409] * 14, codes
    assert live_system.balances() == {"A": 1200, "B": 500, "C": 50}
    live_system.assert_money_conserved()


def test_database_refuses_a_negative_balance_whatever_the_code_does(live_system):
    import mysql.connector
    with pytest.raises(mysql.connector.Error) as refused:
        live_system.query("UPDATE ACCOUNT SET balance = balance - 10000 WHERE id = 'A'")
    assert "account_never_negative" in str(refused.value) or refused.value.errno in (4025, 3819)
    assert live_system.balances() == OPENING


def test_credit_service_down_longer_than_the_attempts_completes_when_it_returns(live_system):
    # The credit is the pivot: it is retried past SAGA_MAX_ATTEMPTS (3) until B is back,
    # the saga showing RUNNING with its attempts meanwhile, and it is never refunded.
    live_system.system.kill("service_b")
    thread, answer = in_background(live_system.transfer, {"amount": 100})
    sid = wait_for(lambda: live_system.query(
        "SELECT id FROM SAGA WHERE step = 1 AND attempt >= 5"), 30, "five credit attempts")[0][0]
    assert live_system.status(sid) == "RUNNING"
    live_system.system.start("service_b")
    join(thread)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert live_system.balances() == {"A": 900, "B": 600, "C": 250}
    calls = live_system.calls(sid)
    assert not [c for c in calls if c[1] == "compensate"]
    credit = [c for c in calls if c[0] == "B"]
    assert len(credit) >= 5 and credit[-1][3] == "success"


def test_refused_credit_refunds_the_debit(live_system):
    live_system.set_fault("B", mode="reject", next=1)
    resp = live_system.transfer({"amount": 100})
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == "credit"
    assert live_system.balances() == OPENING
    assert live_system.calls(body["saga"]) == [
        ("A", "invoke", 1, "success"), ("B", "invoke", 1, "rejected"),
        ("A", "compensate", 1, "success")]
    message, = live_system.query("SELECT message FROM SAGA_LOG WHERE saga_id = %s AND "
                                 "action = 'compensate'", (body["saga"],))[0]
    assert "refunded 100.00 to A" in message


def test_a_refund_is_retried_until_it_lands(make_system):
    system = make_system(SAGA_COMPENSATE_FOR="0.5")
    system.set_fault("B", mode="reject", next=1)
    system.set_fault("A", mode="fail", on="compensate", next=8)
    resp = system.transfer({"amount": 100})
    assert resp.status_code == 409, resp.text
    assert resp.json()["status"] == "COMPENSATED"
    refunds = [c for c in system.calls(resp.json()["saga"]) if c[1] == "compensate"]
    assert len(refunds) == 9 and refunds[-1][3] == "success"
    assert system.balances() == OPENING


def test_kill_of_the_orchestrator_between_debit_and_credit_resumes_and_credits_once(live_system):
    live_system.set_fault("B", mode="slow", seconds=1, next=1)
    thread, answer = in_background(live_system.transfer, {"amount": 100})
    sid = wait_for(lambda: live_system.query("SELECT id FROM SAGA WHERE step = 1"), 30,
                   "the credit step")[0][0]
    live_system.wait_serving("B")
    live_system.system.kill("orchestrator")
    join(thread, 10)
    live_system.system.start("orchestrator")
    assert live_system.wait_status(sid) == "COMPLETED"
    live_system.wait_idle("B")
    assert live_system.balances() == {"A": 900, "B": 600, "C": 250}
    live_system.assert_money_conserved()


@pytest.mark.parametrize("fault", [{"mode": "reject"}, {"mode": "fail"},
                                   {"mode": "hang", "seconds": 20},
                                   {"mode": "slow", "seconds": 20}])
def test_repeated_credit_is_answered_from_the_ledger_before_any_fault(live_system, fault):
    first = live_system.post_service("B", "/invoke", {"saga_id": "t-1", "op": "credit",
                                                      "account": "B", "amount": "5"})
    assert first.status_code == 200, first.text
    live_system.set_fault("B", **fault)   # on every call from now on
    # A stall would run past this client's timeout: the answer must not wait for it.
    again = requests.post(live_system.service("B") + "/invoke", timeout=10, json={
        "saga_id": "t-1", "op": "credit", "account": "B", "amount": "5.00"})
    assert again.status_code == 200 and again.json() == first.json()
    assert live_system.balances()["B"] == 505


def test_a_completed_transfer_cannot_be_compensated(live_system):
    sid = live_system.transfer({"amount": 10}).json()["saga"]
    resp = live_system.post(f"/sagas/{sid}/compensate")
    assert resp.status_code == 409 and "point of no return" in resp.json()["error"]
    assert live_system.balances() == {"A": 990, "B": 510, "C": 250}


def test_accounts_show_money_in_flight_and_say_when_a_balance_cannot_be_read(live_system):
    live_system.set_fault("B", mode="slow", seconds=1.5, next=1)
    thread, _ = in_background(live_system.transfer, {"amount": "40.00"})
    wait_for(lambda: live_system.query("SELECT 1 FROM SAGA WHERE step = 1"), 10, "the credit")
    during = live_system.get("/accounts").json()
    assert during["in_flight"] == "40.00" and during["total"] == "1710.00"
    join(thread)
    live_system.system.kill("service_c")
    partial = live_system.get("/accounts")
    assert partial.status_code == 200
    body = partial.json()
    assert body["complete"] is False and body["total"] is None
    assert body["accounts"][2]["balance"] is None and "C" in body["accounts"][2]["error"]


def test_detail_says_why_a_step_was_not_undone(live_system):
    live_system.set_fault("B", mode="reject", next=1)
    sid = live_system.transfer({"amount": 100}).json()["saga"]
    steps = {s["name"]: s for s in live_system.get(f"/sagas/{sid}").json()["steps"]}
    assert steps["debit"]["compensate"]["status"] == "success"
    assert steps["credit"]["compensate"] == {"status": "skipped", "why": "pivot", "attempts": 0}
