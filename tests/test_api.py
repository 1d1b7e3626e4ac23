"""The operations API: find, inspect and fix sagas; tokens; CORS; hostile queries."""

import threading

import pytest
import requests

from conftest import SEED_INPUT, LiveSystem, in_background, join, system_env
from launcher import System, wait_for


def start_many(live_system, n, **overrides):
    return [live_system.start({**SEED_INPUT, **overrides}).json()["saga"] for _ in range(n)]


def test_list_is_newest_first_and_paged(live_system):
    ids = start_many(live_system, 5)
    first = live_system.get("/sagas", params={"limit": 2}).json()
    assert [s["id"] for s in first["sagas"]] == ids[::-1][:2]
    assert first["next_offset"] == 2
    rest = live_system.get("/sagas", params={"limit": 10, "offset": 2}).json()
    assert [s["id"] for s in rest["sagas"]] == ids[::-1][2:]
    assert rest["next_offset"] is None


def test_list_filters_by_status_and_username(live_system):
    done = start_many(live_system, 2, username="alice")
    live_system.set_fault("C", mode="reject")
    undone = start_many(live_system, 1, username="bob")
    listed = live_system.get("/sagas", params={"status": "COMPENSATED"}).json()["sagas"]
    assert [s["id"] for s in listed] == undone and listed[0]["failed_step"] == "C"
    alice = live_system.get("/sagas", params={"username": "alice"}).json()["sagas"]
    assert sorted(s["id"] for s in alice) == sorted(done)


def test_detail_has_input_step_outcomes_and_log(live_system):
    live_system.set_fault("B", mode="fail", next=1)
    sid = live_system.start().json()["saga"]
    detail = live_system.get(f"/sagas/{sid}").json()
    assert detail["status"] == "COMPLETED" and detail["input"] == SEED_INPUT
    steps = {s["service"]: s for s in detail["steps"]}
    assert steps["B"]["invoke"]["attempts"] == 2 and steps["B"]["invoke"]["status"] == "success"
    assert "compensate" not in steps["A"]
    assert [r["status"] for r in detail["log"]][0] == "STARTED"
    assert detail["results"]["A"]["user_id"] > 0


def test_compensating_a_completed_saga_undoes_it_in_reverse(live_system):
    sid = live_system.start().json()["saga"]
    resp = live_system.post(f"/sagas/{sid}/compensate")
    assert resp.status_code == 200 and resp.json()["status"] == "COMPENSATED"
    assert live_system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    comps = [c[0] for c in live_system.calls(sid) if c[1] == "compensate"]
    assert comps == ["C", "B", "A"]


def test_compensating_a_compensated_saga_changes_nothing(live_system):
    live_system.set_fault("A", mode="reject")
    sid = live_system.start().json()["saga"]
    before = live_system.log(sid)
    resp = live_system.post(f"/sagas/{sid}/compensate")
    assert resp.status_code == 200 and resp.json()["status"] == "COMPENSATED"
    assert live_system.log(sid) == before


def test_retrying_a_saga_that_is_not_failed_is_a_conflict(live_system):
    sid = live_system.start().json()["saga"]
    resp = live_system.post(f"/sagas/{sid}/retry")
    assert resp.status_code == 409
    assert "COMPLETED" in resp.json()["error"]


@pytest.mark.parametrize("action", ["compensate", "retry"])
def test_operator_actions_on_a_choreographed_saga_are_409_and_write_nothing(live_system,
                                                                            action):
    sid = live_system.register().json()["saga"]
    # The last relay's transaction (its 'published' row) may commit just after the end.
    wait_for(lambda: live_system.query("SELECT COUNT(*) FROM OUTBOX WHERE saga_id = %s AND "
                                       "published_at IS NULL", (sid,)) == [(0,)],
             10, "every event of the saga to be published")
    row_before, log_before = live_system.saga_row(sid), live_system.log(sid)
    revision = live_system.query("SELECT revision FROM SAGA WHERE id = %s", (sid,))
    resp = live_system.post(f"/sagas/{sid}/{action}")
    assert resp.status_code == 409 and "choreographed" in resp.json()["error"]
    assert live_system.saga_row(sid) == row_before and live_system.log(sid) == log_before
    assert live_system.query("SELECT revision FROM SAGA WHERE id = %s", (sid,)) == revision


@pytest.mark.parametrize("method, path", [
    ("get", "/sagas/00000000-0000-0000-0000-000000000000"),
    ("get", "/sagas/nope/status"),
    ("post", "/sagas/nope/compensate"),
    ("post", "/sagas/nope/retry"),
    ("get", "/sagas/%27%20OR%201%3D1%20--"),
    ("get", "/sagas/" + "x" * 300),
])
def test_unknown_saga_is_404(live_system, method, path):
    resp = getattr(requests, method)(live_system.url + path, timeout=10)
    assert resp.status_code == 404
    assert resp.json()["field"] == "saga_id"


@pytest.mark.parametrize("query, field", [
    ({"limit": "abc"}, "limit"), ({"limit": "0"}, "limit"), ({"limit": "100000"}, "limit"),
    ({"offset": "-1"}, "offset"), ({"status": "DONE"}, "status"),
    ({"status": "' OR 1=1 --"}, "status"),
])
def test_hostile_query_strings_are_400(live_system, query, field):
    resp = live_system.get("/sagas", params=query)
    assert resp.status_code == 400 and resp.json()["field"] == field


def test_username_filter_is_a_parameter_not_sql(live_system):
    start_many(live_system, 1)
    resp = live_system.get("/sagas", params={"username": "' OR '1'='1"})
    assert resp.status_code == 200 and resp.json()["sagas"] == []


def test_log_tail_returns_rows_after_an_id(live_system):
    sid = live_system.start().json()["saga"]
    rows = live_system.get("/log").json()["log"]
    assert [r["saga_id"] for r in rows] == [sid] * 5
    after = live_system.get("/log", params={"after": rows[2]["id"]}).json()["log"]
    assert [r["id"] for r in after] == [r["id"] for r in rows[3:]]


def test_cors_allows_any_origin_without_credentials(live_system):
    for origin in ("null", "https://evil.example"):
        resp = live_system.get("/sagas", headers={"Origin": origin})
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in resp.headers
    pre = requests.options(live_system.url + "/start", timeout=5, headers={
        "Origin": "null", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "*"


def test_fault_control_through_the_orchestrator(live_system):
    resp = requests.put(live_system.url + "/faults/C", json={"mode": "reject", "next": 1}, timeout=5)
    assert resp.status_code == 200 and resp.json()["fault"]["mode"] == "reject"
    assert live_system.get("/faults").json()["C"]["fault"]["next"] == 1
    assert live_system.start().status_code == 409
    assert live_system.start().status_code == 200
    assert requests.put(live_system.url + "/faults/D", json={"mode": "off"}, timeout=5).status_code == 404


def test_health_all_reports_each_service(live_system):
    body = live_system.get("/health", params={"all": 1}).json()
    assert {k: v["database"] for k, v in body["services"].items()} == {
        "A": "up", "B": "up", "C": "up"}


TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def secured(mariadb, tmp_path_factory):
    """A system with SAGA_API_TOKEN set."""
    dbname = mariadb.create_database("saga_token")
    system = System(str(tmp_path_factory.mktemp("token")),
                    system_env(mariadb, dbname, SAGA_API_TOKEN=TOKEN))
    system.start()
    yield LiveSystem(mariadb, system, dbname)
    system.stop()


class TestToken:
    TOKEN = TOKEN

    def auth(self, token=None):
        return {"Authorization": f"Bearer {token or self.TOKEN}"}

    def test_start_and_reads_stay_open(self, secured):
        resp = secured.start()
        assert resp.status_code == 200
        assert secured.get(f"/sagas/{resp.json()['saga']}").status_code == 200
        assert secured.get("/sagas").status_code == 200

    @pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                         {"Authorization": "Basic czNjcmV0LXRva2Vu"},
                                         {"Authorization": "Bearer"}])
    def test_operator_actions_need_the_token(self, secured, headers):
        sid = secured.start().json()["saga"]
        assert secured.post(f"/sagas/{sid}/compensate", headers=headers).status_code == 401
        assert secured.post(f"/sagas/{sid}/retry", headers=headers).status_code == 401
        assert requests.put(secured.url + "/faults/A", json={"mode": "fail"}, headers=headers,
                            timeout=5).status_code == 401
        assert secured.saga_row(sid)[0] == "COMPLETED"

    def test_operator_action_with_the_token_works(self, secured):
        sid = secured.start().json()["saga"]
        resp = secured.post(f"/sagas/{sid}/compensate", headers=self.auth())
        assert resp.status_code == 200 and resp.json()["status"] == "COMPENSATED"

    def test_services_refuse_calls_without_the_token_but_answer_health(self, secured):
        a = secured.service("A")
        body = {"saga_id": "x1", "username": "mallory"}
        assert requests.post(a + "/invoke", json=body, timeout=5).status_code == 401
        assert requests.post(a + "/compensate", json={"saga_id": "x1"}, timeout=5).status_code == 401
        assert requests.put(a + "/faults", json={"mode": "fail"}, timeout=5).status_code == 401
        assert requests.get(a + "/health", timeout=5).status_code == 200
        assert secured.query("SELECT COUNT(*) FROM TABLE_A WHERE saga_id = 'x1'")[0][0] == 0
        ok = requests.post(a + "/invoke", json=body, headers=self.auth(), timeout=5)
        assert ok.status_code == 200

    def test_token_never_reaches_the_logs(self, secured):
        secured.post("/sagas/nope/retry", headers=self.auth())
        for name in ("orchestrator", "service_a"):
            with open(f"{secured.system.logdir}/{name}.log") as log:
                assert self.TOKEN not in log.read()


def test_compensating_a_running_saga_stops_it_and_undoes_it(live_system):
    live_system.set_fault("B", mode="hang", seconds=2, next=1)
    answer = {}
    client = threading.Thread(target=lambda: answer.update(resp=live_system.start()))
    client.start()
    sid = wait_for(lambda: live_system.query("SELECT id FROM SAGA WHERE step = 1"), 30, "step B")[0][0]
    resp = live_system.post(f"/sagas/{sid}/compensate")
    assert resp.status_code == 200 and resp.json()["status"] == "COMPENSATED"
    client.join(30)
    # The client of /start learns the truth too: its saga was undone.
    assert answer["resp"].json()["status"] == "COMPENSATED"
    live_system.wait_idle("B")
    assert live_system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    assert live_system.saga_row(sid)[0] == "COMPENSATED"


def test_items_carry_type_mode_and_transport_and_filter_by_type(live_system):
    reg = live_system.start().json()["saga"]
    move = live_system.transfer({"amount": 5}).json()["saga"]
    items = {s["id"]: s for s in live_system.get("/sagas").json()["sagas"]}
    assert {k: items[reg][k] for k in ("type", "mode", "transport", "label")} == {
        "type": "registration", "mode": "orchestration", "transport": "http",
        "label": "john_doe"}
    assert items[move]["type"] == "transfer" and items[move]["label"] == "A→B 5.00"
    assert items[move]["input"] == {"from": "A", "to": "B", "amount": "5.00"}
    only = live_system.get("/sagas", params={"type": "transfer"}).json()["sagas"]
    assert [s["id"] for s in only] == [move]
    detail = live_system.get(f"/sagas/{move}").json()
    assert detail["input"] == {"from": "A", "to": "B", "amount": "5.00"}
    assert [(s["name"], s["service"], s["kind"]) for s in detail["steps"]] == [
        ("debit", "A", "compensatable"), ("credit", "B", "retriable")]


def test_log_tail_delivers_a_row_that_commits_after_a_higher_id(live_system):
    first = live_system.get("/log").json()
    # Another session inserts a log row and holds its transaction open: its id is taken
    # now, but the row is invisible until it commits, after the saga's rows below.
    conn = live_system.connect()
    try:
        cur = conn.cursor()
        cur.execute("INSERT INTO SAGA_LOG (saga_id, service, status, message) "
                    "VALUES ('late-one', 'SAGA', 'NOTE', 'committed late')")
        late_id = cur.lastrowid
        sid = live_system.start().json()["saga"]
        second = live_system.get("/log", params={"cursor": first["cursor"]}).json()
        ids = [r["id"] for r in second["log"]]
        assert ids and min(ids) > late_id and {r["saga_id"] for r in second["log"]} == {sid}
        conn.commit()
    finally:
        conn.close()
    third = live_system.get("/log", params={"cursor": second["cursor"]}).json()
    assert [(r["id"], r["message"]) for r in third["log"]] == [(late_id, "committed late")]
    fourth = live_system.get("/log", params={"cursor": third["cursor"]}).json()
    assert fourth["log"] == []


def test_a_bad_log_cursor_is_400(live_system):
    resp = live_system.get("/log", params={"cursor": "not-a-cursor"})
    assert resp.status_code == 400 and resp.json()["field"] == "cursor"


def test_health_reads_and_operator_actions_answer_while_every_web_thread_would_wait(
        make_system):
    # 12 web threads, 8 kept for everything but waiting: 4 /start requests wait for their
    # saga; the others are refused at once (503, Retry-After, nothing written); /health,
    # reads and fault control are answered meanwhile.
    system = make_system(SAGA_WEB_THREADS="12")
    system.set_fault("B", mode="slow", seconds=2)
    clients = [in_background(system.start) for _ in range(12)]
    wait_for(lambda: system.in_flight("B") == 4, 30, "four sagas at B")
    assert system.get("/health").status_code == 200
    assert system.get("/sagas").status_code == 200
    assert requests.put(system.url + "/faults/C", json={"mode": "off"}, timeout=5).status_code == 200
    # An operator action finds no seat to wait in: it is taken all the same, and
    # answered at once.
    running = system.query("SELECT id FROM SAGA WHERE status = 'RUNNING' LIMIT 1")[0][0]
    resp = system.post(f"/sagas/{running}/compensate")
    assert resp.status_code == 202 and resp.json()["status"] == "COMPENSATING", resp.text
    for thread, _ in clients:
        join(thread)
    answers = [answer["resp"] for _, answer in clients]
    assert sorted(a.status_code for a in answers) == [200] * 3 + [409] + [503] * 8
    busy = [a for a in answers if a.status_code == 503]
    assert all(a.headers["Retry-After"] == "1" and "try again" in a.json()["error"] for a in busy)
    system.wait_quiet()
    assert system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 4
    assert system.status(running) == "COMPENSATED"
    system.assert_all_or_nothing()


def test_retrying_a_stuck_saga_undoes_the_step_its_dead_owner_may_have_committed(make_system):
    # One attempt per step; recovery only at start, so the operator is the one who
    # takes the saga over.
    system = make_system(SAGA_LEASE_SECONDS="5", SAGA_RECOVERY_INTERVAL="3600",
                         SAGA_MAX_ATTEMPTS="1")
    system.set_fault("B", mode="slow", seconds=2, next=1)
    thread, _ = in_background(system.start)
    system.wait_serving("B")
    system.system.kill("orchestrator")
    join(thread)
    system.wait_idle("B")                       # B's address committed meanwhile
    sid = system.query("SELECT id FROM SAGA")[0][0]
    assert system.row_counts(sid)["TABLE_B"] == 1
    system.system.kill("service_b")             # and B cannot be reached for a while
    system.system.start("orchestrator")
    wait_for(lambda: system.query("SELECT lease_until < NOW(3) FROM SAGA")[0][0] == 1, 30,
             "the dead orchestrator's lease to lapse")
    stuck = system.post(f"/sagas/{sid}/retry")
    # B refused the connection: that is not a "wrote nothing" for the call its dead
    # owner was making, so B's undo is tried too (and fails while B is down).
    assert stuck.json()["status"] in ("COMPENSATING", "FAILED"), stuck.text
    system.system.start("service_b")
    wait_for(lambda: system.post(f"/sagas/{sid}/retry").json()["status"] == "COMPENSATED"
             or system.status(sid) == "COMPENSATED", 60, "the saga to be compensated")
    assert system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    system.assert_all_or_nothing()
