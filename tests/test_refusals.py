"""Only a refusal a service recorded in its ledger proves a step wrote nothing. Any other
4xx (here: a service restarted with a rotated token the orchestrator does not have yet)
may stand in front of a step that already committed: a pivot is retried until it lands,
and a compensatable step is undone with the rest."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from conftest import in_background, join
from launcher import wait_for

# Retries 3-6 s apart, so a service can be restarted between two attempts.
SLOW_RETRIES = {"SAGA_API_TOKEN": "first", "SAGA_BACKOFF_BASE": "6", "SAGA_BACKOFF_MAX": "6"}


def authorized(token):
    return {"Authorization": f"Bearer {token}"}


def drop_next_answer(system, service):
    """The next call commits at `service`, then its connection is cut."""
    resp = requests.put(system.service(service) + "/faults", json={"mode": "drop", "next": 1},
                        headers=authorized(system.system.env["SAGA_API_TOKEN"]), timeout=10)
    assert resp.status_code == 200, resp.text


def restart_with_token(system, service, token):
    system.system.env["SAGA_API_TOKEN"] = token
    system.system.restart(f"service_{service.lower()}")


def wait_for_answer(system, saga_id, service, http_status):
    wait_for(lambda: system.query(
        "SELECT COUNT(*) FROM SAGA_LOG WHERE saga_id = %s AND service = %s "
        "AND http_status = %s", (saga_id, service, http_status))[0][0] > 0,
        30, f"a call at {service} answered {http_status}")


def saga_of(system, saga_type):
    return wait_for(lambda: (system.query("SELECT id FROM SAGA WHERE type = %s",
                                          (saga_type,)) or [[None]])[0][0],
                    10, f"the {saga_type} saga to be created")


def test_a_4xx_the_ledger_did_not_record_never_refunds_a_committed_credit(make_system):
    system = make_system(**SLOW_RETRIES)
    drop_next_answer(system, "B")
    client, answer = in_background(system.transfer, {"amount": 100})
    saga_id = saga_of(system, "transfer")
    wait_for(lambda: system.balances()["B"] == 600, 10, "the credit to commit at B")
    restart_with_token(system, "B", "rotated")
    wait_for_answer(system, saga_id, "B", 401)
    assert system.status(saga_id) == "RUNNING"
    assert system.balances() == {"A": 900, "B": 600, "C": 250}   # no refund

    restart_with_token(system, "B", "first")
    join(client)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert answer["resp"].json()["status"] == "COMPLETED"
    assert system.balances() == {"A": 900, "B": 600, "C": 250}
    system.assert_money_conserved()


class ForwardingProxy:
    """A proxy in front of a service that passes every call on and hands the caller the
    service's answer, except that it answers each /invoke with its own 400 (after the
    service has run it): a 4xx from something in between, not from the ledger."""

    def __init__(self, target):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                upstream = requests.post(target + self.path, data=body, timeout=10,
                                         headers={"Content-Type": "application/json"})
                status, data = upstream.status_code, upstream.content
                if self.path == "/invoke":
                    proxy.invokes += 1
                    status, data = 400, b'{"error": "bad request (proxy)"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.invokes = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_a_proxys_4xx_after_the_step_committed_undoes_that_step_too(make_system):
    system = make_system()
    proxy = ForwardingProxy(system.service("B"))
    try:
        system.system.env["SERVICE_B_URL"] = proxy.url
        system.system.restart("orchestrator")
        resp = system.start()
    finally:
        proxy.close()
    assert resp.status_code == 502, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == "B"
    assert proxy.invokes == 3
    assert system.calls(body["saga"]) == [
        ("A", "invoke", 1, "success"), ("B", "invoke", 1, "failed"),
        ("B", "invoke", 2, "failed"), ("B", "invoke", 3, "failed"),
        ("B", "compensate", 1, "success"), ("A", "compensate", 1, "success")]
    system.assert_all_or_nothing()


def test_a_refusal_recorded_in_the_ledger_says_so(live_system):
    live_system.set_fault("B", mode="reject", next=1)
    resp = live_system.post_service("B", "/invoke", {"saga_id": "s-1", "op": "address",
                                                     "user_id": 1, "address": "x"})
    assert resp.status_code == 422
    assert resp.json()["ledger"] == "refused"
    again = live_system.post_service("B", "/invoke", {"saga_id": "s-1", "op": "address",
                                                      "user_id": 1, "address": "x"})
    assert again.status_code == 422 and again.json()["ledger"] == "refused"
    # A call that does not fit the operation is a 400 the ledger knows nothing of.
    bad = live_system.post_service("B", "/invoke", {"saga_id": "s-2", "op": "address"})
    assert bad.status_code == 400 and "ledger" not in bad.json()
