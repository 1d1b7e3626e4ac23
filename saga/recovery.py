"""Recovery: on start and every SAGA_RECOVERY_INTERVAL, claim the orchestrated sagas whose
lease lapsed (their orchestrator died or froze) and resume them; now and then, purge
finished sagas older than SAGA_RETENTION_DAYS. Claiming moves the saga's fence, so the
old owner, should it wake, can no longer write; resuming counts the call the old owner
may have been making as made, so nothing is lost and no retry budget starts over."""

import logging
import threading
import time

import mysql.connector

from saga.common import UnsupportedServer, purge_interval
from saga.engine import Engine

log = logging.getLogger("saga")


def recover_expired_sagas(engine: Engine) -> int:
    """Claim and resume only what this process can drive now (a driver thread is free
    for it): a saga claimed and left queued would have its lease renewed here while a
    less busy peer could have run it. No driver sleeps through a saga's wait, so free
    ones come round quickly."""
    limit = min(50, engine.free_drivers())
    if limit <= 0:
        return 0
    sagas = engine.store.claim_expired(limit, engine.active_ids())
    for saga in sagas:
        log.info("saga %s: resuming %s at step %d attempt %d", saga.id, saga.status,
                 saga.step + 1, saga.attempt)
        engine.run(saga, resumed=True)
    return len(sagas)


def purge_old_sagas(engine: Engine) -> int:
    days = engine.settings.retention_days
    if days <= 0:
        return 0
    total = 0
    while not engine.stopping.is_set():
        purged = engine.store.purge_finished(days)
        total += purged
        if purged == 0:
            break
    if total:
        log.info("retention: purged %d sagas finished more than %g days ago", total, days)
    return total


def start_recovery(engine: Engine) -> threading.Thread:
    def loop():
        next_purge = time.monotonic()
        while True:
            try:
                recover_expired_sagas(engine)
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + purge_interval(engine.settings.retention_days)
                    purge_old_sagas(engine)
            except (mysql.connector.Error, UnsupportedServer) as exc:
                log.warning("recovery scan failed: %s", exc)
            except Exception:
                log.exception("recovery scan failed")
            if engine.stopping.wait(engine.settings.recovery_interval):
                return

    thread = threading.Thread(target=loop, name="recovery", daemon=True)
    thread.start()
    return thread
