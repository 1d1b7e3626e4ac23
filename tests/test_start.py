"""The happy path: the seed's curl, what it writes, and how SAGA_LOG tells it."""

import requests

from conftest import SEED_INPUT


def test_seed_curl_completes_with_one_row_per_table(live_system):
    resp = live_system.start(SEED_INPUT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "COMPLETED"
    assert live_system.row_counts(body["saga"]) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    (user_id, username), = live_system.query("SELECT id, username FROM TABLE_A WHERE saga_id = %s",
                                      (body["saga"],))
    assert username == "john_doe"
    assert live_system.query("SELECT user_id, address FROM TABLE_B WHERE saga_id = %s",
                      (body["saga"],)) == [(user_id, "123 Main St")]
    assert live_system.query("SELECT user_id, payment_method FROM TABLE_C WHERE saga_id = %s",
                      (body["saga"],)) == [(user_id, "Visa")]
    assert live_system.saga_row(body["saga"])[0] == "COMPLETED"


def test_saga_log_tells_every_step_in_order(live_system):
    sid = live_system.start().json()["saga"]
    assert live_system.log(sid) == [
        ("SAGA", None, None, "STARTED"),
        ("A", "invoke", 1, "success"),
        ("B", "invoke", 1, "success"),
        ("C", "invoke", 1, "success"),
        ("SAGA", None, None, "COMPLETED"),
    ]
    elapsed = live_system.query("SELECT elapsed_ms, http_status, step FROM SAGA_LOG "
                         "WHERE saga_id = %s AND service <> 'SAGA' ORDER BY id", (sid,))
    assert [(code, step) for _, code, step in elapsed] == [(200, 1), (200, 2), (200, 3)]
    assert all(ms is not None for ms, _, _ in elapsed)


def test_seed_style_log_query_reads_newest_first(live_system):
    sid = live_system.start().json()["saga"]
    rows = live_system.query("SELECT saga_id, service, status FROM SAGA_LOG ORDER BY created_at DESC, id DESC")
    assert rows[0] == (sid, "SAGA", "COMPLETED")
    assert rows[-1] == (sid, "SAGA", "STARTED")


def test_unicode_username_round_trips_exactly(live_system):
    name = "Zoë 名前 😀"
    sid = live_system.start({"username": name, "address": "Straße 1 ☃", "payment": "💳"}).json()["saga"]
    assert live_system.query("SELECT username FROM TABLE_A WHERE saga_id = %s", (sid,)) == [(name,)]
    assert live_system.query("SELECT payment_method FROM TABLE_C WHERE saga_id = %s", (sid,)) == [("💳",)]
    assert live_system.get(f"/sagas/{sid}").json()["input"]["username"] == name


def test_quotes_and_markup_are_stored_literally(live_system):
    hostile = "Robert'); DROP TABLE TABLE_A;-- <img src=x onerror=alert(1)> \"q\" \\"
    resp = live_system.start({"username": hostile, "address": "1 \"Quote\" St", "payment": "Visa"})
    assert resp.status_code == 200
    sid = resp.json()["saga"]
    assert live_system.query("SELECT username FROM TABLE_A WHERE saga_id = %s", (sid,)) == [(hostile,)]
    assert live_system.query("SELECT COUNT(*) FROM TABLE_A")[0][0] == 1


def test_maximum_length_values_are_accepted(live_system):
    long = "é" * 255
    resp = live_system.start({"username": long, "address": long, "payment": long})
    assert resp.status_code == 200
    assert live_system.query("SELECT username FROM TABLE_A WHERE saga_id = %s",
                      (resp.json()["saga"],)) == [(long,)]


def test_seed_004_start_alias_runs_a_saga(live_system):
    resp = live_system.post("/sagas/start", json=SEED_INPUT)
    assert resp.status_code == 200 and resp.json()["status"] == "COMPLETED"
    sid = resp.json()["saga"]
    status = live_system.get(f"/sagas/{sid}/status").json()
    assert status["status"] == "COMPLETED" and status["id"] == sid


def test_each_process_answers_health_with_its_database(live_system):
    for name in ("orchestrator", "service_a", "service_b", "service_c"):
        resp = requests.get(live_system.system.url(name) + "/health", timeout=5)
        assert resp.status_code == 200
        assert resp.json()["database"] == "up"


def test_orchestrator_serves_the_ui(live_system):
    resp = live_system.get("/")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
