"""The orchestrator's API, described as OpenAPI 3 and served at GET /openapi.json. Its
enums and request bodies come from the constants and saga definitions they describe.
tests/test_openapi.py validates real responses against it and fuzzes it."""

from saga.common import SERVICES
from saga.faults import FAULT_MODES, FAULT_TARGETS
from saga.definitions import SAGA_TYPES
from saga.model import ACTIONS, MODES, STATES, TRANSPORTS

NULLABLE_TEXT = {"type": ["string", "null"]}
STEP_NAMES = sorted({step.name for t in SAGA_TYPES.values() for step in t.steps})


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def query(name, schema):
    return {"name": name, "in": "query", "schema": schema}


def json_body(schema, description=""):
    return {"description": description or "JSON",
            "content": {"application/json": {"schema": schema}}}


ERROR = json_body(ref("Error"), "an error naming the problem (and the field, if one)")
SAGA_ID = {"name": "saga_id", "in": "path", "required": True, "schema": {"type": "string"}}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "description": "1-255 visible ASCII characters; a repeat with the same "
                                  "key and body answers about the first request's saga",
                   "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}}


def answers(**codes):
    return {code.lstrip("_"): (ERROR if schema == "error" else json_body(ref(schema), text))
            for code, (schema, text) in codes.items()}


OUTCOME = dict(
    _200=("SagaAnswer", "COMPLETED: every step committed"),
    _202=("SagaAnswer", "still running after SAGA_START_WAIT; it finishes in the background"),
    _409=("SagaAnswer", "COMPENSATED because a service refused a step (a refusal its "
                        "ledger recorded) or an operator compensated it"),
    _502=("SagaAnswer", "COMPENSATED or FAILED because a service kept failing"),
    _400=("error", ""), _413=("error", ""), _415=("error", ""),
    _422=("error", "the Idempotency-Key was used for another request, or its saga was "
                   "purged"),
    _503=("error", "the database is unreachable, or too many requests are waiting for their "
                   "saga (Retry-After); nothing written"),
)


def input_schema(saga_type):
    return {"type": "object", "additionalProperties": False,
            "required": [f.name for f in saga_type.fields if f.required],
            "properties": {f.name: f.schema for f in saga_type.fields}}


def typed_input_schema(saga_type):
    """The type's fields with saga_type naming it (the body of /sagas/start)."""
    schema = input_schema(saga_type)
    return {**schema, "required": ["saga_type", *schema["required"]],
            "properties": {"saga_type": {"const": saga_type.name}, **schema["properties"]}}


def input_name(saga_type) -> str:
    return f"{saga_type.name.capitalize()}Input"


def start(saga_type, operation_id, summary=None):
    return {"summary": summary or saga_type.summary, "operationId": operation_id,
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(input_name(saga_type))}}},
            "responses": answers(**OUTCOME)}


OPERATOR = {"security": [{}, {"bearer": []}]}
SAGA_TYPE_NAMES = list(SAGA_TYPES)
FIRST_TYPE = next(iter(SAGA_TYPES.values()), None)   # none: the process will not start

SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "Saga orchestrator", "version": "2.0.0",
             "description": "Runs sagas of the registered types ("
                            + ", ".join(SAGA_TYPES) + ") with compensation; see README.md."},
    "paths": {
        **{t.start_path: {"post": start(t, f"start_{t.name}")}
           for t in SAGA_TYPES.values() if t.start_path},
        **({"/sagas/start": {"post": {
            **start(FIRST_TYPE, "startAny", "Start a saga of any type: a saga type's fields "
                    f"with saga_type naming it, or without it the {FIRST_TYPE.name}'s"),
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "oneOf": [ref(input_name(FIRST_TYPE)),
                          *(typed_input_schema(t) for t in SAGA_TYPES.values())]}}}}}}}
           if FIRST_TYPE else {}),
        "/saga-types/{name}/views/{view}": {"get": {
            "summary": "A saga type's read at the service that holds it (the order's orders "
                       "and customers), passed on",
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string"}},
                           {"name": "view", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": json_body({"type": "object"}, "the service's answer"),
                          "404": ERROR, "502": ERROR}}},
        "/saga-types": {"get": {
            "summary": "The registered saga types: fields (with their JSON schema), steps, "
                       "modes",
            "responses": answers(_200=("SagaTypes", "every registered type"))}},
        "/sagas": {"get": {
            "summary": "List sagas, newest first",
            "parameters": [
                query("status", {"type": "string", "enum": list(STATES)}),
                query("type", {"type": "string", "enum": SAGA_TYPE_NAMES}),
                query("mode", {"type": "string", "enum": list(MODES)}),
                query("label", {"type": "string"}),
                *(query(t.label_param, {"type": "string"}) for t in SAGA_TYPES.values()
                  if t.label_param),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                query("offset", {"type": "integer", "minimum": 0, "maximum": 10000000}),
            ],
            "responses": answers(_200=("SagaList", "a page of sagas"), _400=("error", ""),
                                 _503=("error", "")),
        }},
        "/sagas/{saga_id}": {"get": {
            "summary": "One saga with its input, step outcomes and SAGA_LOG rows",
            "parameters": [SAGA_ID],
            "responses": answers(_200=("SagaDetail", "the saga"), _404=("error", ""),
                                 _503=("error", "")),
        }},
        "/sagas/{saga_id}/status": {"get": {
            "summary": "One saga's state, without its log",
            "parameters": [SAGA_ID],
            "responses": answers(_200=("SagaItem", "the saga's state"), _404=("error", ""),
                                 _503=("error", "")),
        }},
        "/sagas/{saga_id}/compensate": {"post": {
            "summary": "Undo a saga in reverse order (no-op for a compensated one; refused "
                       "for one past its point of no return)",
            "parameters": [SAGA_ID], **OPERATOR,
            "responses": answers(_200=("SagaAnswer", "compensated (or already was)"),
                                 _202=("SagaAnswer", "compensation still running"),
                                 _401=("error", ""), _404=("error", ""), _409=("error", ""),
                                 _503=("error", "")),
        }},
        "/sagas/{saga_id}/retry": {"post": {
            "summary": "Re-drive a FAILED saga's compensation, or a stuck saga",
            "parameters": [SAGA_ID], **OPERATOR,
            "responses": answers(_200=("SagaAnswer", "finished"),
                                 _202=("SagaAnswer", "still running"),
                                 _401=("error", ""), _404=("error", ""), _409=("error", ""),
                                 _503=("error", "")),
        }},
        "/log": {"get": {
            "summary": "Tail SAGA_LOG: the newest rows, then pass back `cursor` for the "
                       "rows after them (rows that commit late are included)",
            "parameters": [
                query("cursor", {"type": "string"}),
                query("after", {"type": "integer", "minimum": 0, "maximum": 2 ** 62}),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
            ],
            "responses": answers(_200=("LogList", "log rows, oldest first"),
                                 _400=("error", ""), _503=("error", "")),
        }},
        **({"/accounts": {"get": {
            "summary": "Each service's account balance, read from the service, and the total",
            "responses": answers(_200=("Accounts", "every balance (complete: false when "
                                                   "a service could not be read)"))}}}
           if "transfer" in SAGA_TYPES else {}),
        "/fault-modes": {"get": {
            "summary": "What each fault mode does, and whether the call's work commits",
            "responses": {"200": json_body({"type": "object", "required": ["modes"],
                                            "properties": {"modes": {"type": "array"}}})}}},
        "/faults": {"get": {
            "summary": "Each service's failure-simulation setting",
            "responses": {"200": json_body({"type": "object",
                                            "additionalProperties": {"type": "object"}})},
        }},
        "/faults/{service}": {"put": {
            "summary": "Change one service's failure simulation",
            "parameters": [{"name": "service", "in": "path", "required": True,
                            "schema": {"type": "string"}}], **OPERATOR,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref("Fault")}}},
            "responses": answers(_200=("FaultState", "the new setting"), _400=("error", ""),
                                 _401=("error", ""), _404=("error", ""), _413=("error", ""),
                                 _415=("error", ""), _502=("error", "")),
        }},
        "/health": {"get": {
            "summary": "This process and its database (add ?all=1 for the services)",
            "responses": answers(_200=("Health", "can serve"),
                                 _503=("Health", "database down")),
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format), every worker's counts added up",
            "responses": {"200": {"description": "the metrics",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}},
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": json_body({"type": "object"})}}},
        "/": {"get": {"summary": "ui.html, the live monitor", "responses": {
            "200": {"description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "SAGA_API_TOKEN, when it is set"}},
        "schemas": {
            **{input_name(t): input_schema(t) for t in SAGA_TYPES.values()},
            "SagaTypes": {"type": "object", "required": ["saga_types"], "properties": {
                "saga_types": {"type": "array", "items": {
                    "type": "object", "required": ["name", "summary", "fields", "steps", "modes"],
                    "properties": {"name": {"enum": SAGA_TYPE_NAMES},
                                   "summary": {"type": "string"},
                                   "fields": {"type": "array", "items": {"type": "object"}},
                                   "steps": {"type": "array", "items": {"type": "object"}},
                                   "modes": {"type": "array", "items": {"enum": list(MODES)}},
                                   "start_path": {"type": ["string", "null"]},
                                   "choreography_path": {"type": ["string", "null"]},
                                   "colour": {"type": "string"},
                                   "example": {"type": "object"},
                                   "views": {"type": "object"}}}},
                "services": {"type": "object", "additionalProperties": {
                    "type": "array", "items": {"type": "object", "required": ["type", "op"]}}}}},
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string"}, "field": {"type": "string"}}},
            "SagaAnswer": {"type": "object", "required": ["saga", "status"], "properties": {
                "saga": {"type": "string"}, "type": {"enum": SAGA_TYPE_NAMES},
                "status": {"enum": list(STATES)}, "failed_step": NULLABLE_TEXT,
                "reason": NULLABLE_TEXT, "results": {"type": "object"},
                "repeated": {"type": "boolean"}}},
            "SagaItem": {"type": "object", "required": [
                "id", "type", "mode", "transport", "status", "current_step", "attempt",
                "label", "input", "rejected", "created_at", "updated_at"],
                "properties": {
                    "id": {"type": "string"}, "type": {"enum": SAGA_TYPE_NAMES},
                    "mode": {"enum": list(MODES)}, "transport": {"enum": list(TRANSPORTS)},
                    "status": {"enum": list(STATES)},
                    "current_step": {"enum": [*STEP_NAMES, None]},
                    "rejected": {"type": "boolean"},
                    "attempt": {"type": "integer"}, "label": {"type": "string"},
                    "input": {"type": "object"}, "failed_step": NULLABLE_TEXT,
                    "reason": NULLABLE_TEXT, "created_at": {"type": "string"},
                    "updated_at": {"type": "string"}}},
            "SagaList": {"type": "object", "required": ["sagas", "limit", "offset", "next_offset"],
                         "properties": {"sagas": {"type": "array", "items": ref("SagaItem")},
                                        "limit": {"type": "integer"},
                                        "offset": {"type": "integer"},
                                        "next_offset": {"type": ["integer", "null"]}}},
            "StepOutcome": {"type": "object", "required": ["status", "attempts"], "properties": {
                "status": {"type": "string"}, "attempts": {"type": "integer"},
                "why": {"enum": ["refused", "not_reached", "pivot"]},
                "http_status": {"type": ["integer", "null"]},
                "elapsed_ms": {"type": ["integer", "null"]}, "message": NULLABLE_TEXT}},
            "SagaDetail": {"allOf": [ref("SagaItem"), {"type": "object", "required": [
                "results", "steps", "log"], "properties": {
                "results": {"type": "object"},
                "steps": {"type": "array", "items": {
                    "type": "object", "required": ["name", "service", "op", "kind"],
                    "properties": {"name": {"type": "string"}, "service": {"enum": list(SERVICES)},
                                   "op": {"type": "string"}, "kind": {"type": "string"},
                                   "invoke": ref("StepOutcome"),
                                   "compensate": ref("StepOutcome")}}},
                "log": {"type": "array", "items": ref("LogRow")}}}]},
            "LogRow": {"type": "object", "required": ["id", "saga_id", "service", "status",
                                                      "created_at"],
                       "properties": {
                           "id": {"type": "integer"}, "saga_id": {"type": "string"},
                           "service": {"type": "string"}, "status": {"type": "string"},
                           "message": NULLABLE_TEXT, "created_at": {"type": "string"},
                           "step": {"type": ["integer", "null"]}, "op": NULLABLE_TEXT,
                           "action": {"enum": [*ACTIONS, "publish", None]},
                           "event": NULLABLE_TEXT,
                           "attempt": {"type": ["integer", "null"]},
                           "http_status": {"type": ["integer", "null"]},
                           "elapsed_ms": {"type": ["integer", "null"]}}},
            "LogList": {"type": "object", "required": ["log", "cursor"], "properties": {
                "log": {"type": "array", "items": ref("LogRow")},
                "cursor": {"type": "string"}}},
            "Accounts": {"type": "object", "required": ["accounts", "total", "in_flight",
                                                        "complete"], "properties": {
                "in_flight": {"type": "string"}, "complete": {"type": "boolean"},
                "accounts": {"type": "array", "items": {
                    "type": "object", "required": ["id", "service", "balance"],
                    "properties": {"id": {"enum": list(SERVICES)},
                                   "service": {"enum": list(SERVICES)},
                                   "balance": NULLABLE_TEXT, "error": {"type": "string"}}}},
                "total": NULLABLE_TEXT}},
            "Fault": {"type": "object", "additionalProperties": False, "properties": {
                "mode": {"enum": list(FAULT_MODES)},
                "every": {"type": "integer", "minimum": 1, "maximum": 1000000},
                "rate": {"type": "number", "minimum": 0, "maximum": 1},
                "next": {"type": "integer", "minimum": 0, "maximum": 1000000},
                "seconds": {"type": "number", "minimum": 0, "maximum": 300},
                "on": {"enum": list(FAULT_TARGETS)}}},
            "FaultState": {"type": "object", "required": ["fault", "calls"], "properties": {
                "fault": {"type": "object"}, "calls": {"type": "integer"}}},
            "Health": {"type": "object", "required": ["status", "database"], "properties": {
                "service": {"type": "string"}, "status": {"enum": ["ok", "degraded"]},
                "database": {"enum": ["up", "down"]}, "owner": {"type": "string"},
                "active_sagas": {"type": "integer", "description": "being driven here now"},
                "waiting_sagas": {"type": "integer",
                                  "description": "owned here, waiting for a retry that is due later"},
                "transport": {"type": "string"},
                "services": {"type": "object"}}},
        },
    },
}
