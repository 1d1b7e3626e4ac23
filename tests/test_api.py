"""The operations API: find, inspect and fix sagas; tokens; CORS; hostile queries."""

import threading

import pytest
import requests

from conftest import SEED_INPUT, TEST_ENV, Saga
from launcher import System, wait_for


def start_many(saga, n, **overrides):
    return [saga.start({**SEED_INPUT, **overrides}).json()["saga"] for _ in range(n)]


def test_list_is_newest_first_and_paged(saga):
    ids = start_many(saga, 5)
    first = saga.get("/sagas", params={"limit": 2}).json()
    assert [s["id"] for s in first["sagas"]] == ids[::-1][:2]
    assert first["next_offset"] == 2
    rest = saga.get("/sagas", params={"limit": 10, "offset": 2}).json()
    assert [s["id"] for s in rest["sagas"]] == ids[::-1][2:]
    assert rest["next_offset"] is None


def test_list_filters_by_status_and_username(saga):
    done = start_many(saga, 2, username="alice")
    saga.set_fault("C", mode="reject")
    undone = start_many(saga, 1, username="bob")
    listed = saga.get("/sagas", params={"status": "COMPENSATED"}).json()["sagas"]
    assert [s["id"] for s in listed] == undone and listed[0]["failed_step"] == "C"
    alice = saga.get("/sagas", params={"username": "alice"}).json()["sagas"]
    assert sorted(s["id"] for s in alice) == sorted(done)


def test_detail_has_input_step_outcomes_and_log(saga):
    saga.set_fault("B", mode="fail", next=1)
    sid = saga.start().json()["saga"]
    detail = saga.get(f"/sagas/{sid}").json()
    assert detail["status"] == "COMPLETED" and detail["input"] == SEED_INPUT
    steps = {s["service"]: s for s in detail["steps"]}
    assert steps["B"]["invoke"]["attempts"] == 2 and steps["B"]["invoke"]["status"] == "success"
    assert "compensate" not in steps["A"]
    assert [r["status"] for r in detail["log"]][0] == "STARTED"
    assert detail["results"]["A"]["user_id"] > 0


def test_compensating_a_completed_saga_undoes_it_in_reverse(saga):
    sid = saga.start().json()["saga"]
    resp = saga.post(f"/sagas/{sid}/compensate")
    assert resp.status_code == 200 and resp.json()["status"] == "COMPENSATED"
    assert saga.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    comps = [c[0] for c in saga.calls(sid) if c[1] == "compensate"]
    assert comps == ["C", "B", "A"]


def test_compensating_a_compensated_saga_changes_nothing(saga):
    saga.set_fault("A", mode="reject")
    sid = saga.start().json()["saga"]
    before = saga.log(sid)
    resp = saga.post(f"/sagas/{sid}/compensate")
    assert resp.status_code == 200 and resp.json()["status"] == "COMPENSATED"
    assert saga.log(sid) == before


def test_retrying_a_saga_that_is_not_failed_is_a_conflict(saga):
    sid = saga.start().json()["saga"]
    resp = saga.post(f"/sagas/{sid}/retry")
    assert resp.status_code == 409
    assert "COMPLETED" in resp.json()["error"]


@pytest.mark.parametrize("method, path", [
    ("get", "/sagas/00000000-0000-0000-0000-000000000000"),
    ("get", "/sagas/nope/status"),
    ("post", "/sagas/nope/compensate"),
    ("post", "/sagas/nope/retry"),
    ("get", "/sagas/%27%20OR%201%3D1%20--"),
    ("get", "/sagas/" + "x" * 300),
])
def test_unknown_saga_is_404(saga, method, path):
    resp = getattr(requests, method)(saga.url + path, timeout=10)
    assert resp.status_code == 404
    assert resp.json()["field"] == "saga_id"


@pytest.mark.parametrize("query, field", [
    ({"limit": "abc"}, "limit"), ({"limit": "0"}, "limit"), ({"limit": "100000"}, "limit"),
    ({"offset": "-1"}, "offset"), ({"status": "DONE"}, "status"),
    ({"status": "' OR 1=1 --"}, "status"),
])
def test_hostile_query_strings_are_400(saga, query, field):
    resp = saga.get("/sagas", params=query)
    assert resp.status_code == 400 and resp.json()["field"] == field


def test_username_filter_is_a_parameter_not_sql(saga):
    start_many(saga, 1)
    resp = saga.get("/sagas", params={"username": "' OR '1'='1"})
    assert resp.status_code == 200 and resp.json()["sagas"] == []


def test_log_tail_returns_rows_after_an_id(saga):
    sid = saga.start().json()["saga"]
    rows = saga.get("/log").json()["log"]
    assert [r["saga_id"] for r in rows] == [sid] * 5
    after = saga.get("/log", params={"after": rows[2]["id"]}).json()["log"]
    assert [r["id"] for r in after] == [r["id"] for r in rows[3:]]


def test_cors_allows_any_origin_without_credentials(saga):
    for origin in ("null", "https://evil.example"):
        resp = saga.get("/sagas", headers={"Origin": origin})
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in resp.headers
    pre = requests.options(saga.url + "/start", timeout=5, headers={
        "Origin": "null", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "*"


def test_fault_control_through_the_orchestrator(saga):
    resp = requests.put(saga.url + "/faults/C", json={"mode": "reject", "next": 1}, timeout=5)
    assert resp.status_code == 200 and resp.json()["fault"]["mode"] == "reject"
    assert saga.get("/faults").json()["C"]["fault"]["next"] == 1
    assert saga.start().status_code == 409
    assert saga.start().status_code == 200
    assert requests.put(saga.url + "/faults/D", json={"mode": "off"}, timeout=5).status_code == 404


def test_health_all_reports_each_service(saga):
    body = saga.get("/health", params={"all": 1}).json()
    assert {k: v["database"] for k, v in body["services"].items()} == {
        "A": "up", "B": "up", "C": "up"}


TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def secured(mariadb, tmp_path_factory):
    """A system with SAGA_API_TOKEN set."""
    dbname = mariadb.create_database("saga_token")
    system = System(str(tmp_path_factory.mktemp("token")), {
        **TEST_ENV, "SAGA_DB_PORT": str(mariadb.port), "SAGA_DB_NAME": dbname,
        "SAGA_API_TOKEN": TOKEN})
    system.start()
    yield Saga(mariadb, system, dbname)
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


def test_compensating_a_running_saga_stops_it_and_undoes_it(saga):
    saga.set_fault("B", mode="hang", seconds=2, next=1)
    answer = {}
    client = threading.Thread(target=lambda: answer.update(resp=saga.start()))
    client.start()
    sid = wait_for(lambda: saga.query("SELECT id FROM SAGA WHERE step = 1"), 30, "step B")[0][0]
    resp = saga.post(f"/sagas/{sid}/compensate")
    assert resp.status_code == 200 and resp.json()["status"] == "COMPENSATED"
    client.join(30)
    # The client of /start learns the truth too: its saga was undone.
    assert answer["resp"].json()["status"] == "COMPENSATED"
    saga.wait_idle("B")
    assert saga.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    assert saga.saga_row(sid)[0] == "COMPENSATED"
