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
    # FAILED -> COMPENSATED: in a choreography, a redelivered undo that was still in
    # flight when its twin parked the saga can finish the undo after all.
    Status.FAILED: {Status.COMPENSATING, Status.COMPENSATED},
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
    schema: dict                       # its JSON schema (OpenAPI, /saga-types, the UI)
    required: bool = True              # False: the schema says its default


@dataclass(frozen=True)
class Step:
    name: str                          # names the step in results and answers: "A", "debit"
    op: str                            # the service's operation that runs it: "user", "debit"
    service: Callable[[dict], str]     # the service that runs it, from the saga's input
    build: Callable[[dict, dict], dict]  # the call's fields from the input and results
    kind: StepKind = StepKind.COMPENSATABLE
    attempts: int | None = None        # forward attempts before undoing (SAGA_MAX_ATTEMPTS)
    timeout: float | None = None       # seconds to wait for each answer (SAGA_READ_TIMEOUT)


@dataclass(frozen=True)
class Choreographed:
    """How a saga type runs without an orchestrator: started by POST `path` at its first
    step's service, the services react to each other's events. `events` renames the
    generic <type>.<op>.<done|failed|undone> events a protocol already names."""
    path: str
    events: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SagaType:
    """Everything about one kind of saga, declared in its own module (sagas/): its input,
    its steps, each participant's operations for it, its tables and its invariant. The
    engine, the services, the API, the UI and the tools derive from it."""
    name: str
    summary: str
    fields: tuple[Field, ...]
    steps: tuple[Step, ...]
    label: Callable[[dict], str]       # a short text that names one saga in a list
    check: Callable[[dict], None] = lambda data: None   # rules across fields
    # Whether a compensation that keeps failing ends in FAILED after SAGA_COMPENSATE_FOR
    # (False: it is retried until it succeeds, e.g. a refund that must not be dropped).
    compensation_gives_up: bool = True
    # participant.operations.Operation for each step's op, each naming its services.
    operations: tuple = ()
    tables: tuple[str, ...] = ()       # its business tables, children first
    schema: str = ""                   # their DDL (re-appliable), and opening rows
    reset: tuple[str, ...] = ()        # SQL that puts its tables back to their opening
    # invariant(cursor) -> what is wrong with its data when no saga is active (empty: all
    # or nothing, money conserved, whatever the type promises).
    invariant: Callable[[Any], list[str]] = lambda cur: []
    start_path: str | None = None      # the orchestrator's own path for it ("/transfer")
    choreography: Choreographed | None = None
    # service -> a Flask blueprint with the service's reads for this type (GET /accounts)
    routes: Callable[[str, Any], Any] | None = None
    # reads -> a Flask blueprint of the orchestrator's own reads for this type, given
    # what they may use (api.OrchestratorReads: the services, the saga store)
    orchestrator_routes: Callable[[Any], Any] | None = None
    # A query parameter of GET /sagas that means "of this type, labelled so" (username)
    label_param: str | None = None
    colour: str = "#6b7280"            # how the UI tells it apart
    example: dict = field(default_factory=dict)   # an input that works (UI, docs)
    # name -> (service, path): a service's read that the orchestrator passes on at
    # GET /saga-types/<type>/views/<name> (the order's orders and customers)
    views: dict = field(default_factory=dict)
    sample: Callable[[Any], dict] | None = None   # sample(random.Random) -> a varied input (chaos)

    def __post_init__(self):
        kinds = [s.kind for s in self.steps]
        if StepKind.RETRIABLE in kinds and StepKind.COMPENSATABLE in \
                kinds[kinds.index(StepKind.RETRIABLE):]:
            raise ValueError(f"{self.name}: compensatable steps must come before retriable ones")
        if self.operations:
            self.check_calls()

    def check_calls(self) -> None:
        """Each step's call must fit the operation it names, or the process does not
        start: at run time a call that does not fit is a 4xx that says nothing of what
        was written, so it would only ever be retried and then undone."""
        for step in self.steps:
            ops = [o for o in self.operations if o.name == step.op]
            if not ops:
                raise ValueError(f"{self.name}: step {step.name} calls {step.op!r}, which "
                                 "is none of the type's operations")
            try:
                sent = set(step.build(_Probe(), _Probe()))
            except Exception:   # a build that computes on its values cannot be probed
                continue
            if sent != set(ops[0].fields):
                raise ValueError(f"{self.name}: step {step.name} sends {sorted(sent)}, but "
                                 f"operation {step.op} takes {sorted(ops[0].fields)}")
        for step in self.steps[self.pivot + 1:] if self.pivot is not None else ():
            if any(o.refuses for o in self.operations if o.name == step.op):
                raise ValueError(f"{self.name}: step {step.name} comes after the pivot "
                                 f"({self.steps[self.pivot].name}), which cannot be undone: "
                                 f"its operation {step.op} must be declared refuses=False")

    @property
    def pivot(self) -> int | None:
        """The first retriable step: once it may have committed, the saga only goes on."""
        return next((k for k, s in enumerate(self.steps) if s.kind == StepKind.RETRIABLE),
                    None)

    def read_input(self, body: dict) -> dict:
        data = {f.name: f.read(body) for f in self.fields}
        self.check(data)
        return data

    def service_of(self, step: int, data: dict) -> str:
        return self.steps[step].service(data)


class _Probe(dict):
    """Stands in for a saga's input and results when a step's build is checked: any key
    reads as another probe."""

    def __getitem__(self, key):
        return _Probe()

    def get(self, key, default=None):
        return _Probe()


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
    trace: str | None = None     # the W3C traceparent its calls are children of
    started_at: float | None = None   # Unix time it started (its duration, in metrics)

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
