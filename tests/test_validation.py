"""Bad input gets a 4xx JSON error naming the field and the problem, and writes nothing."""

import json

import pytest
import requests

GOOD = {"username": "john_doe", "address": "123 Main St", "payment": "Visa"}


def without(field):
    return {k: v for k, v in GOOD.items() if k != field}


BAD_BODIES = [
    pytest.param(without("username"), 400, "username", "required", id="missing-username"),
    pytest.param(without("payment"), 400, "payment", "required", id="missing-payment"),
    pytest.param({**GOOD, "address": None}, 400, "address", "required", id="null-address"),
    pytest.param({**GOOD, "username": 42}, 400, "username", "must be a string", id="number"),
    pytest.param({**GOOD, "address": ["x"]}, 400, "address", "must be a string", id="array"),
    pytest.param({**GOOD, "payment": {"a": 1}}, 400, "payment", "must be a string", id="object"),
    pytest.param({**GOOD, "username": True}, 400, "username", "must be a string", id="boolean"),
    pytest.param({**GOOD, "username": ""}, 400, "username", "must not be empty", id="empty"),
    pytest.param({**GOOD, "address": "   "}, 400, "address", "must not be empty", id="blank"),
    pytest.param({**GOOD, "username": "x" * 256}, 400, "username", "at most 255", id="too-long"),
    pytest.param({**GOOD, "payment": "Vi\x00sa"}, 400, "payment", "NUL", id="nul-byte"),
    pytest.param({**GOOD, "admin": True}, 400, "admin", "unknown field", id="unknown-field"),
]


def assert_nothing_written(live_system):
    for table in ("SAGA", "SAGA_LOG", "TABLE_A", "TABLE_B", "TABLE_C", "STEP_LEDGER"):
        assert live_system.query(f"SELECT COUNT(*) FROM {table}")[0][0] == 0, table


@pytest.mark.parametrize("body, code, field, problem", BAD_BODIES)
def test_bad_field_is_named_and_nothing_is_written(live_system, body, code, field, problem):
    resp = live_system.post("/start", json=body)
    assert resp.status_code == code, resp.text
    answer = resp.json()
    assert answer["field"] == field
    assert problem in answer["error"]
    assert_nothing_written(live_system)


RAW_BODIES = [
    pytest.param(b'{"username": "a", ', "application/json", 400, "not valid JSON", id="malformed"),
    pytest.param(b'["a", "b"]', "application/json", 400, "must be a JSON object", id="array-body"),
    pytest.param(b'"just a string"', "application/json", 400, "must be a JSON object", id="string-body"),
    pytest.param(b"", "application/json", 400, "not valid JSON", id="empty-body"),
    pytest.param(b"username=a", "application/x-www-form-urlencoded", 415, "Content-Type", id="form"),
    pytest.param(json.dumps(GOOD).encode(), "text/plain", 415, "Content-Type", id="text-plain"),
    pytest.param(b"\xff\xfe{}", "application/json", 400, "not valid JSON", id="not-utf8"),
    pytest.param(b"[" * 20000 + b"]" * 20000, "application/json", 400, "nested too deeply", id="deep-nesting"),
    pytest.param(b'{"username": "' + b"x" * 70000 + b'"}', "application/json", 413, "larger than", id="oversized"),
]


@pytest.mark.parametrize("raw, content_type, code, problem", RAW_BODIES)
def test_unreadable_body_is_refused_and_nothing_is_written(live_system, raw, content_type, code, problem):
    resp = live_system.post("/start", data=raw, headers={"Content-Type": content_type})
    assert resp.status_code == code, resp.text
    assert problem in resp.json()["error"]
    assert_nothing_written(live_system)


@pytest.mark.parametrize("service, body, field", [
    ("A", {"saga_id": "s1"}, "username"),
    ("A", {"username": "bob"}, "saga_id"),
    ("B", {"saga_id": "s1", "user_id": "7", "address": "x"}, "user_id"),
    ("B", {"saga_id": "s1", "user_id": -1, "address": "x"}, "user_id"),
    ("C", {"saga_id": "s1", "user_id": 1}, "payment_method"),
    ("C", {"saga_id": "x" * 37, "user_id": 1, "payment_method": "Visa"}, "saga_id"),
    ("B", {"saga_id": "s1", "op": "nope", "user_id": 1, "address": "x"}, "op"),
    ("B", {"saga_id": "s1", "op": ["address"], "user_id": 1, "address": "x"}, "op"),
])
def test_services_refuse_bad_invoke_and_write_nothing(live_system, service, body, field):
    resp = requests.post(live_system.service(service) + "/invoke", json=body, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["field"] == field
    assert_nothing_written(live_system)


def test_service_b_refuses_a_user_that_does_not_exist_and_remembers_it(live_system):
    resp = requests.post(live_system.service("B") + "/invoke", timeout=5,
                         json={"saga_id": "s1", "user_id": 999999, "address": "x"})
    assert resp.status_code == 422
    assert resp.json()["field"] == "user_id"
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    # The refusal is final: recorded, so a repeat is refused again and never writes.
    assert live_system.query("SELECT service, state FROM STEP_LEDGER") == [("B", "refused")]


@pytest.mark.parametrize("fault, field", [
    ({"mode": "explode"}, "mode"),
    ({"mode": "fail", "every": 0}, "every"),
    ({"mode": "fail", "rate": 1.5}, "rate"),
    ({"mode": "fail", "every": 2, "rate": 0.5}, "rate"),
    ({"mode": "hang", "seconds": -1}, "seconds"),
    ({"mode": "fail", "on": "sometimes"}, "on"),
    ({"mode": "fail", "colour": "red"}, "colour"),
])
def test_bad_fault_setting_is_refused_and_leaves_faults_unchanged(live_system, fault, field):
    resp = requests.put(live_system.service("A") + "/faults", json=fault, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["field"] == field
    assert requests.get(live_system.service("A") + "/faults", timeout=5).json()["fault"]["mode"] == "off"
