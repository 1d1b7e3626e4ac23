"""The chaos harness's clients: threads that start sagas and record every answer.

Each saga request is drawn from the seed and its number alone (so a replay sends the
same requests whichever client takes them): its type (one of the run's), its input
(the type's `sample(rng)`, or its example) and how it is started: at the type's own
path on an orchestrator (the seed's /start, /transfer) or at /sagas/start, or, in a
choreography, at the type's path at its first step's service (with and without the
trailing slash). Every request carries an Idempotency-Key made of the run's tag and its
number: one that got no answer (or a 503) is sent again with the same key, which must
answer about the one saga the key made. "Connection refused" (nothing was sent) is
retried the same way."""

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import requests

ORCHESTRATOR = None     # a request's target when it goes to an orchestrator


@dataclass
class Answer:
    index: int
    url: str
    code: int | None          # None: no answer (the connection died or timed out)
    saga: str | None
    status: str | None
    results: dict | None
    error: str | None
    seconds: float
    at: float = 0.0           # time.monotonic() when the answer (or its absence) came
    kind: str = ""            # the saga type
    sent: dict = field(default_factory=dict)   # the saga's input, as sent
    repeated: bool = False    # answered about the saga an earlier request with its key made
    key: str | None = None    # the Idempotency-Key the request carried


@dataclass
class Request:
    kind: str                 # the saga type
    target: str | None        # ORCHESTRATOR, or the service a choreography starts at
    path: str
    data: dict                # the saga's input
    body: dict                # what is posted
    key: str


def first_service(saga_type) -> str:
    return saga_type.steps[0].service({})


def draw_request(saga_types, choreography, seed, key, index) -> Request:
    pick = random.Random(f"{seed}-saga-{index}")
    saga_type = pick.choice(saga_types)
    data = saga_type.sample(pick) if saga_type.sample else dict(saga_type.example)
    name = saga_type.name
    if choreography:
        path = saga_type.choreography.path.rstrip("/") + ("/" if pick.random() < 0.5 else "")
        return Request(name, first_service(saga_type), path, data, data, key)
    if saga_type.start_path and pick.random() < 0.75:
        return Request(name, ORCHESTRATOR, saga_type.start_path, data, data, key)
    return Request(name, ORCHESTRATOR, "/sagas/start", data, {"saga_type": name, **data}, key)


def not_sent(exc):
    """True when the request cannot have reached the server (so retrying makes no
    second saga): the connection was refused or never opened."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if (isinstance(cause, ConnectionRefusedError)
                or type(cause).__name__ == "NewConnectionError"):
            return True
        cause = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__ or (
            cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None)
    return False


class Clients:
    """--clients threads taking saga numbers 0..N-1 from a shared counter; each number is
    one saga request, sent again under its Idempotency-Key until it is answered."""

    def __init__(self, urls, saga_types, choreography, sagas, clients, seed, tag, timeout,
                 deadline, retry_for):
        # urls: {ORCHESTRATOR: [...]} or {service: [...]} for a choreography's starts.
        self.urls, self.saga_types, self.choreography = urls, saga_types, choreography
        self.sagas, self.clients = sagas, clients
        self.seed, self.tag, self.timeout = seed, tag, timeout
        self.deadline, self.retry_for = deadline, retry_for
        self.lock = threading.Lock()
        self.next_index = 0
        self.answers = []
        self.retried = Counter()       # why a saga request was sent again
        self.gave_up = 0
        self.finished = 0              # saga requests done with (answered or not)
        self.stopped_early = False
        self.threads = []
        # Past N sagas, keep sending while this says the chaos has not covered
        # everything yet (so a short run still kills and freezes every process).
        self.more = lambda: False

    def key(self, index):
        return f"{self.key_prefix()}{index}"

    def key_prefix(self):
        """What every Idempotency-Key of this run starts with."""
        return f"{self.tag}-"

    def request(self, index):
        return draw_request(self.saga_types, self.choreography, self.seed, self.key(index),
                            index)

    def start(self):
        for k in range(self.clients):
            t = threading.Thread(target=self._client, args=(k,), name=f"client{k}", daemon=True)
            t.start()
            self.threads.append(t)

    def running(self):
        return any(t.is_alive() for t in self.threads)

    def sent(self):
        with self.lock:
            return self.next_index

    def _take(self):
        with self.lock:
            if self.next_index >= self.sagas and not self.more():
                return None
            if time.monotonic() > self.deadline:
                self.stopped_early = True
                return None
            self.next_index += 1
            return self.next_index - 1

    def _client(self, k):
        rng = random.Random(f"{self.seed}-client-{k}")
        while (index := self._take()) is not None:
            self._one(k, index, self.request(index), rng)
            with self.lock:
                self.finished += 1

    def _retry(self, why, give_up):
        with self.lock:
            if time.monotonic() > give_up:
                self.gave_up += 1
                return False
            self.retried[why] += 1
            return True

    def _record(self, answer):
        answer.at = time.monotonic()
        with self.lock:
            self.answers.append(answer)

    def _one(self, k, index, req, rng):
        give_up = min(time.monotonic() + self.retry_for, self.deadline + self.retry_for)
        urls = self.urls[req.target]
        turn = k
        while True:
            url = urls[turn % len(urls)]
            turn += 1
            started = time.monotonic()
            try:
                resp = requests.post(url + req.path, json=req.body,
                                     headers={"Idempotency-Key": req.key},
                                     timeout=(1, self.timeout))
            except requests.RequestException as exc:
                if not_sent(exc):
                    if not self._retry("connection refused", give_up):
                        return
                    time.sleep(rng.uniform(0.05, 0.3))
                    continue
                self._record(Answer(index, url, None, None, None, None,
                                    f"{type(exc).__name__}: {str(exc)[:200]}",
                                    time.monotonic() - started, kind=req.kind,
                                    sent=req.data, key=req.key))
                # With a key, asking again is safe: it answers about the saga the first
                # request made, if it made one, and makes it if not.
                if self._retry("no answer (same key)", give_up):
                    time.sleep(rng.uniform(0.05, 0.3))
                    continue
                return
            try:
                body = resp.json()
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            error = body.get("error")
            if body.get("detail"):
                error = f"{error} ({body['detail']})"
            answer = Answer(index, url, resp.status_code, body.get("saga"), body.get("status"),
                            body.get("results"), error, time.monotonic() - started,
                            kind=req.kind, sent=req.data,
                            repeated=body.get("repeated") is True, key=req.key)
            self._record(answer)
            if resp.status_code == 503 and answer.saga is None:
                # The database was unreachable and the start made nothing (or, if its
                # commit landed unacknowledged, a saga the key finds on the next try).
                if not self._retry("503", give_up):
                    return
                time.sleep(rng.uniform(0.1, 0.5))
                continue
            return
