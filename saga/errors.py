"""The engine's own exceptions, in one place."""


class SagaError(Exception):
    pass


class LostLease(SagaError):
    """Another orchestrator (or an operator action) has taken this saga: its fence moved
    on, so this driver must stop and write nothing more."""


class HandOver(SagaError):
    """The request driving a saga on its own thread is out of time: a driver thread
    carries on from where it stopped."""


class IllegalTransition(SagaError):
    """A status change the state machine does not allow (a bug, or a racing operator)."""


class KnownStart(SagaError):
    """An Idempotency-Key that was already used: `saga_id` is the saga its first request
    created; `same_request` tells whether this request asks for the same thing."""

    def __init__(self, saga_id: str, same_request: bool):
        super().__init__(saga_id)
        self.saga_id, self.same_request = saga_id, same_request
