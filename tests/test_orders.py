"""Seed 003's order saga on the kit: A is the order service, B the customer service.
Choreographed over RabbitMQ with the seed's events (POST /orders at A), or orchestrated
through /sagas/start. A balance never goes negative, money is conserved, and an order is
FULFILLED exactly when its saga COMPLETED."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

SEED_ORDER = {"customer_id": 1, "product_id": 1, "status": "pending", "quantity": 1,
              "total_price": 50.0}


def place(system, body=None, path="/orders/", **kwargs):
    return requests.post(system.service("A") + path, json=body or SEED_ORDER, timeout=60,
                         **kwargs)


def orders(system):
    return system.get_service("A", "/orders")["orders"]


def customers(system):
    return {c["id"]: c["balance"] for c in system.get_service("B", "/customers")["customers"]}


def test_seed_curl_places_an_order_that_is_fulfilled_by_events(live_system):
    resp = place(live_system)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["type"] == "order" and body["status"] == "COMPLETED"
    assert customers(live_system) == {1: "450.00", 2: "100.00", 3: "0.00"}
    order, = orders(live_system)
    assert order == {"id": order["id"], "saga": body["saga"], "customer_id": 1,
                     "product_id": 1, "quantity": 1, "total_price": "50.00",
                     "status": "FULFILLED"}
    assert live_system.get_service("A", f"/orders/{order['id']}") == order
    # The seed's events, in order, each a SAGA_LOG row.
    published = [e for s, a, e, _ in live_system.events(body["saga"]) if a == "publish"]
    assert published == ["order.created", "order.fulfilled", "order.fulfil.done"]
    item = live_system.get(f"/sagas/{body['saga']}").json()
    assert item["mode"] == "choreography" and item["type"] == "order"
    live_system.assert_invariants()


@pytest.mark.parametrize("customer, reason", [(3, "insufficient balance"),
                                              (9, "unknown customer 9")])
def test_a_refused_charge_rejects_the_order_and_moves_no_money(live_system, customer, reason):
    resp = place(live_system, {**SEED_ORDER, "customer_id": customer})
    assert resp.status_code == 409, resp.text
    assert resp.json()["status"] == "COMPENSATED" and reason in resp.json()["reason"]
    assert [o["status"] for o in orders(live_system)] == ["REJECTED"]
    assert customers(live_system) == {1: "500.00", 2: "100.00", 3: "0.00"}
    published = [e for s, a, e, _ in live_system.events(resp.json()["saga"]) if a == "publish"]
    assert published == ["order.created", "order.rejected"]
    live_system.assert_invariants()


def test_the_same_order_runs_orchestrated(live_system):
    resp = live_system.post("/sagas/start", json={"saga_type": "order", **SEED_ORDER})
    assert resp.status_code == 200, resp.text
    assert live_system.get(f"/sagas/{resp.json()['saga']}").json()["mode"] == "orchestration"
    assert [o["status"] for o in orders(live_system)] == ["FULFILLED"]
    refused = live_system.post("/sagas/start", json={
        "saga_type": "order", **SEED_ORDER, "customer_id": 2, "total_price": "100.01"})
    assert refused.status_code == 409 and "insufficient" in refused.json()["reason"]
    assert customers(live_system) == {1: "450.00", 2: "100.00", 3: "0.00"}
    assert [o["status"] for o in orders(live_system)] == ["REJECTED", "FULFILLED"]
    live_system.assert_invariants()


BAD = [
    ({**SEED_ORDER, "quantity": 0}, "quantity"),
    ({**SEED_ORDER, "quantity": 1001}, "quantity"),
    ({**SEED_ORDER, "total_price": 1.234}, "total_price"),
    ({**SEED_ORDER, "total_price": 0}, "total_price"),
    ({**SEED_ORDER, "customer_id": "1"}, "customer_id"),
    ({**SEED_ORDER, "product_id": -1}, "product_id"),
    ({**SEED_ORDER, "status": "shipped"}, "status"),
    ({**SEED_ORDER, "coupon": "x"}, "coupon"),
    ({k: v for k, v in SEED_ORDER.items() if k != "total_price"}, "total_price"),
]


@pytest.mark.parametrize("body, field", BAD)
def test_a_bad_order_is_400_naming_the_field_and_writes_nothing(live_system, body, field):
    for resp in (place(live_system, body),
                 live_system.post("/sagas/start", json={"saga_type": "order", **body})):
        assert resp.status_code == 400, resp.text
        assert resp.json()["field"] == field
    assert orders(live_system) == [] and live_system.query("SELECT COUNT(*) FROM SAGA") == [(0,)]


def test_an_order_with_the_same_idempotency_key_is_placed_once(live_system):
    headers = {"Idempotency-Key": "order-42"}
    first, again = place(live_system, headers=headers), place(live_system, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["saga"] == first.json()["saga"] and again.json()["repeated"] is True
    assert len(orders(live_system)) == 1 and customers(live_system)[1] == "450.00"


@pytest.mark.parametrize("how", ["choreographed", "orchestrated"])
def test_concurrent_orders_never_overdraw_a_customer(live_system, how):
    body = {**SEED_ORDER, "customer_id": 2, "total_price": "30.00"}

    def one(_):
        if how == "choreographed":
            return place(live_system, body).status_code
        return live_system.post("/sagas/start", json={"saga_type": "order", **body}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(one, range(8)))
    assert codes == [200] * 3 + [409] * 5
    assert customers(live_system)[2] == "10.00"
    live_system.wait_quiet()
    live_system.assert_invariants()


def test_a_charge_that_fails_is_retried_until_it_lands(live_system):
    # The charge is the pivot: a 5xx after it may have committed is never undone by
    # rejecting the order, only retried (here past SAGA_MAX_ATTEMPTS).
    live_system.set_fault("B", mode="fail", next=4)
    resp = place(live_system)
    assert resp.status_code == 200, resp.text
    assert [o["status"] for o in orders(live_system)] == ["FULFILLED"]
    charges = [r for r in live_system.events(resp.json()["saga"])
               if r[0] == "B" and r[1] == "invoke"]
    assert [r[3] for r in charges] == ["failed"] * 4 + ["success"]
    live_system.assert_invariants()


def test_saga_types_lists_the_order_with_its_fields_steps_and_modes(live_system):
    types = {t["name"]: t for t in live_system.get("/saga-types").json()["saga_types"]}
    assert list(types) == ["registration", "transfer", "order"]
    order = types["order"]
    assert [f["name"] for f in order["fields"]] == [
        "customer_id", "product_id", "quantity", "total_price", "status"]
    assert {f["name"]: f["required"] for f in order["fields"]}["status"] is False
    assert [(s["name"], s["service"], s["kind"]) for s in order["steps"]] == [
        ("order", "A", "compensatable"), ("charge", "B", "retriable"),
        ("fulfil", "A", "retriable")]
    assert order["modes"] == ["orchestration", "choreography"]
    assert types["transfer"]["steps"][0]["service"] is None   # the input names it


def test_the_orchestrator_passes_on_the_orders_and_the_customers(live_system):
    place(live_system)
    customers_view = live_system.get("/saga-types/order/views/customers")
    assert customers_view.status_code == 200
    assert customers_view.json()["customers"][0] == {"id": 1, "balance": "450.00"}
    assert [o["status"] for o in live_system.get("/saga-types/order/views/orders").json()[
        "orders"]] == ["FULFILLED"]
    for path in ("/saga-types/order/views/nope", "/saga-types/nope/views/orders"):
        resp = live_system.get(path)
        assert resp.status_code == 404 and resp.json()["field"] == "view"


@pytest.mark.parametrize("how", ["choreographed", "orchestrated"])
def test_a_step_after_the_charge_is_never_refused_only_retried(live_system, how):
    # A says no to every second call: the order (1st) passes, the fulfilment (2nd) would
    # be refused after the customer was charged. Past the pivot it is a failure, retried.
    live_system.set_fault("A", mode="reject", every=2)
    if how == "choreographed":
        resp = place(live_system)
    else:
        resp = live_system.post("/sagas/start", json={"saga_type": "order", **SEED_ORDER})
    assert resp.status_code == 200, resp.text
    assert [o["status"] for o in orders(live_system)] == ["FULFILLED"]
    assert customers(live_system)[1] == "450.00"
    live_system.assert_invariants()


def test_a_type_whose_step_after_the_pivot_could_refuse_does_not_load():
    from saga.model import SagaType, Step, StepKind
    from saga.participant.operations import Operation
    op = Operation("x", ("A",), ("v",), lambda b: b, lambda c, s, v: {})
    with pytest.raises(ValueError, match="after the pivot"):
        SagaType("bad", "", (), (
            Step("p", "x", lambda d: "A", lambda d, r: {"v": 1}, StepKind.RETRIABLE),
            Step("q", "x", lambda d: "A", lambda d, r: {"v": 1}, StepKind.RETRIABLE)),
            label=str, operations=(op,))
