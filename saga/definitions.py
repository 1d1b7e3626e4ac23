"""The registry of saga types. Each type is one module (the demo's are in sagas/) that
declares its input, steps, operations, tables and invariant; SAGA_TYPE_MODULES (a
comma-separated list of modules, each with one SagaType at module level) says which are
registered (the demo's common.py names the demo's). Everything else (the engine, the
services, the API, the UI, the tools) reads the types from here."""

import importlib
import os

from saga.model import SagaType


def load_types(modules: str) -> dict[str, SagaType]:
    types = {}
    for name in filter(None, (m.strip() for m in modules.split(","))):
        module = importlib.import_module(name)
        found = [v for v in vars(module).values() if isinstance(v, SagaType)]
        if len(found) != 1:
            raise ImportError(f"{name} must define exactly one SagaType, not {len(found)}")
        types[found[0].name] = found[0]
    return types


SAGA_TYPES: dict[str, SagaType] = load_types(os.environ.get("SAGA_TYPE_MODULES", ""))


def register(saga_types) -> None:
    """Register types given in code (SagaParticipant(saga_types=...)) beside those of
    SAGA_TYPE_MODULES, so every part of the process knows them by name."""
    for saga_type in saga_types:
        SAGA_TYPES.setdefault(saga_type.name, saga_type)
