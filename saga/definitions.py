"""The saga types, as data. The engine, the store, the API, the UI and the chaos harness
work on any of these; adding one is a definition here plus each service's operation."""

from common import SERVICES
from saga.model import Field, SagaType, Step, StepKind
from validation import ApiError, amount_field, choice_field, text_field

# Non-empty, not only whitespace, no NUL: the same rule as validation.text_field.
TEXT_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 255,
               "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"}
AMOUNT_SCHEMA = {"oneOf": [
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000, "multipleOf": 0.01},
    {"type": "string", "pattern": "^[0-9]{1,7}(\\.[0-9]{1,2})?$"}]}
ACCOUNT_SCHEMA = {"type": "string", "enum": list(SERVICES)}


def text(name: str) -> Field:
    return Field(name, lambda body: text_field(body, name), TEXT_SCHEMA)


def always(service: str):
    return lambda data: service


REGISTRATION = SagaType(
    name="registration",
    summary="Register a user: A stores the user, B the address, C the payment method",
    fields=(text("username"), text("address"), text("payment")),
    steps=(
        Step("A", "user", always("A"), lambda data, results: {
            "username": data["username"]}),
        Step("B", "address", always("B"), lambda data, results: {
            "user_id": results["A"]["user_id"], "address": data["address"]}),
        Step("C", "payment", always("C"), lambda data, results: {
            "user_id": results["A"]["user_id"], "payment_method": data["payment"]}),
    ),
    label=lambda data: data["username"],
)


def _different_accounts(data: dict) -> None:
    if data["from"] == data["to"]:
        raise ApiError(f"to must be another account than from ({data['from']})", "to")


TRANSFER = SagaType(
    name="transfer",
    summary="Move money: debit one account, then credit another (refund if refused)",
    fields=(
        Field("from", lambda body: choice_field(body, "from", SERVICES, default="A"),
              ACCOUNT_SCHEMA),
        Field("to", lambda body: choice_field(body, "to", SERVICES, default="B"),
              ACCOUNT_SCHEMA),
        Field("amount", amount_field, AMOUNT_SCHEMA),
    ),
    steps=(
        Step("debit", "debit", lambda data: data["from"], lambda data, results: {
            "account": data["from"], "amount": data["amount"]}),
        # The credit is the pivot: reversing a credit that may already be spent is how
        # sagas overdraw accounts, so once sent it is only ever retried.
        Step("credit", "credit", lambda data: data["to"], lambda data, results: {
            "account": data["to"], "amount": data["amount"]}, StepKind.RETRIABLE),
    ),
    label=lambda data: f"{data['from']}→{data['to']} {data['amount']}",
    check=_different_accounts,
    # A refund that gave up would leave the money nowhere: it is retried until it lands.
    compensation_gives_up=False,
)

SAGA_TYPES = {t.name: t for t in (REGISTRATION, TRANSFER)}
