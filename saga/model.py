"""The saga model: the states a saga goes through and which moves between them are
allowed, what a saga type is (its input and its steps, as data), one saga's state, and
the outcome of one call to a service. Nothing here does I/O."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable


class Status(str, Enum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"      # a compensation could not be made to succeed: needs an operator

    def __str__(self):
        return self.value


STATES = tuple(s.value for s in Status)
ACTIVE = frozenset({Status.RUNNING, Status.COMPENSATING})

# Every write of a saga's status is checked against this. RUNNING -> COMPENSATED is a
# failure at a step that wrote nothing with nothing before it to undo. COMPLETED ->
# COMPENSATING and FAILED -> COMPENSATING are operator actions.
TRANSITIONS = {
    Status.RUNNING: {Status.RUNNING, Status.COMPLETED, Status.COMPENSATING, Status.COMPENSATED},
    Status.COMPENSATING: {Status.COMPENSATING, Status.COMPENSATED, Status.FAILED},
    Status.COMPLETED: {Status.COMPENSATING},
    Status.FAILED: {Status.COMPENSATING},
    Status.COMPENSATED: set(),
}

MODES = ("orchestration", "choreography")
TRANSPORTS = ("http", "kafka", "rabbitmq")  # rabbitmq: the events of a choreography
ACTIONS = ("invoke", "compensate")


class StepKind(str, Enum):
    # Undone by its compensation when a later step fails.
    COMPENSATABLE = "compensatable"
    # A pivot: once it may have committed it is never undone, only retried until it
    # succeeds; a refusal (which proves nothing was written) undoes the steps before it.
    RETRIABLE = "retriable"


@dataclass(frozen=True)
class Field:
    """One input field of a saga type: `read(body)` returns the checked value or raises
    validation.ApiError naming the field."""
    name: str
    read: Callable[[dict], Any]
    schema: dict                       # its JSON schema, for the OpenAPI document


@dataclass(frozen=True)
class Step:
    name: str                          # names the step in results and answers: "A", "debit"
    op: str                            # the service's operation that runs it: "user", "debit"
    service: Callable[[dict], str]     # the service that runs it, from the saga's input
    build: Callable[[dict, dict], dict]  # the call's fields from the input and results
    kind: StepKind = StepKind.COMPENSATABLE


@dataclass(frozen=True)
class SagaType:
    name: str
    summary: str
    fields: tuple[Field, ...]
    steps: tuple[Step, ...]
    label: Callable[[dict], str]       # a short text that names one saga in a list
    check: Callable[[dict], None] = lambda data: None   # rules across fields
    # Whether a compensation that keeps failing ends in FAILED after SAGA_COMPENSATE_FOR
    # (False: it is retried until it succeeds, e.g. a refund that must not be dropped).
    compensation_gives_up: bool = True

    def __post_init__(self):
        kinds = [s.kind for s in self.steps]
        if StepKind.RETRIABLE in kinds and StepKind.COMPENSATABLE in \
                kinds[kinds.index(StepKind.RETRIABLE):]:
            raise ValueError(f"{self.name}: compensatable steps must come before retriable ones")

    def read_input(self, body: dict) -> dict:
        data = {f.name: f.read(body) for f in self.fields}
        self.check(data)
        return data

    def service_of(self, step: int, data: dict) -> str:
        return self.steps[step].service(data)


@dataclass
class Saga:
    """One saga's state as the engine holds it. (step, attempt) is the next call to make;
    `touched` says whether the current step may have written something (an attempt that
    may have reached the service and was not refused)."""
    id: str
    type: SagaType
    status: Status
    step: int
    attempt: int
    input: dict
    fence: int
    revision: int
    mode: str = "orchestration"
    transport: str = "http"
    results: dict = field(default_factory=dict)
    failed_step: str | None = None
    reason: str | None = None
    rejected: bool = False
    touched: bool = False
    wait: float = 0.0                           # seconds until the next call is due
    compensate_deadline: float | None = None    # time.monotonic() when compensation gives up
    saved_status: Status | None = None          # the status the database holds
    # Driving on a request's thread: when it must hand over, and a save it could not
    # finish for the driver thread that carries on.
    hand_over_at: float | None = None
    unsaved: tuple | None = None

    @property
    def current(self) -> Step:
        return self.type.steps[min(self.step, len(self.type.steps) - 1)]

    @property
    def service(self) -> str:
        return self.current.service(self.input)

    def call_fields(self) -> dict:
        return self.current.build(self.input, self.results)


@dataclass(frozen=True)
class Outcome:
    """What one call to a service came to.
    ok: it succeeded. refused: the service said no to the business request, and the
    refusal is final (nothing was written, and nothing will be for this saga and step).
    reached: False only when the request provably never got to the service (refused
    connection, name not resolved, connect timeout), so it cannot have written anything."""
    ok: bool
    refused: bool
    reached: bool
    status_code: int | None
    elapsed_ms: int
    message: str
    body: dict | None = None

    @property
    def retryable(self) -> bool:
        return not self.ok and not self.refused
