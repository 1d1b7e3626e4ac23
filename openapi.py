"""The orchestrator's API, described as OpenAPI 3 and served at GET /openapi.json.
tests/test_openapi.py validates real responses against it and fuzzes it."""

STATUSES = ["RUNNING", "COMPLETED", "COMPENSATING", "COMPENSATED", "FAILED"]
# Non-empty, not only whitespace, no NUL: the same rule as common.text_field.
TEXT = {"type": "string", "minLength": 1, "maxLength": 255,
        "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"}
NULLABLE_TEXT = {"type": ["string", "null"]}


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema, description=""):
    return {"description": description or "JSON", "content": {"application/json": {"schema": schema}}}


ERROR = json_body(ref("Error"), "an error naming the problem (and the field, if one)")
SAGA_ID = {"name": "saga_id", "in": "path", "required": True, "schema": {"type": "string"}}


def answers(**codes):
    return {str(code): (ERROR if schema == "error" else json_body(ref(schema), text))
            for code, (schema, text) in ((c.lstrip("_"), v) for c, v in codes.items())}


OUTCOME = dict(
    _200=("SagaAnswer", "COMPLETED: every step committed"),
    _202=("SagaAnswer", "still running after SAGA_START_WAIT; it finishes in the background"),
    _409=("SagaAnswer", "COMPENSATED because a service rejected a step"),
    _502=("SagaAnswer", "COMPENSATED or FAILED because a service kept failing"),
)
BAD_INPUT = dict(_400=("error", ""), _413=("error", ""), _415=("error", ""), _503=("error", ""))

START = {
    "summary": "Run a registration saga and wait for its outcome",
    "requestBody": {"required": True, "content": {"application/json": {"schema": ref("StartRequest")}}},
    "responses": answers(**OUTCOME, **BAD_INPUT),
}

OPERATOR = {"security": [{}, {"bearer": []}]}

SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "Saga orchestrator", "version": "1.0.0",
             "description": "Runs A -> B -> C as a saga with compensation; see README.md."},
    "paths": {
        "/start": {"post": {**START, "operationId": "start"}},
        "/sagas/start": {"post": {**START, "operationId": "startAlias",
                                  "summary": "Seed 004's path for /start"}},
        "/sagas": {"get": {
            "summary": "List sagas, newest first",
            "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string", "enum": STATUSES}},
                {"name": "username", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 10000000}},
            ],
            "responses": answers(_200=("SagaList", "a page of sagas"), _400=("error", ""),
                                 _503=("error", "")),
        }},
        "/sagas/{saga_id}": {"get": {
            "summary": "One saga with its input, step outcomes and SAGA_LOG rows",
            "parameters": [SAGA_ID],
            "responses": answers(_200=("SagaDetail", "the saga"), _404=("error", ""), _503=("error", "")),
        }},
        "/sagas/{saga_id}/status": {"get": {
            "summary": "Seed 004's status path",
            "parameters": [SAGA_ID],
            "responses": answers(_200=("SagaItem", "the saga's state"), _404=("error", ""),
                                 _503=("error", "")),
        }},
        "/sagas/{saga_id}/compensate": {"post": {
            "summary": "Undo a saga in reverse order (no-op for a compensated one)",
            "parameters": [SAGA_ID], **OPERATOR,
            "responses": answers(_200=("SagaAnswer", "compensated (or already was)"),
                                 _202=("SagaAnswer", "compensation still running"),
                                 _401=("error", ""), _404=("error", ""), _409=("error", ""),
                                 _503=("error", "")),
        }},
        "/sagas/{saga_id}/retry": {"post": {
            "summary": "Re-drive a FAILED saga's compensation, or a stuck saga",
            "parameters": [SAGA_ID], **OPERATOR,
            "responses": answers(_200=("SagaAnswer", "finished"), _202=("SagaAnswer", "still running"),
                                 _401=("error", ""), _404=("error", ""), _409=("error", ""),
                                 _503=("error", "")),
        }},
        "/log": {"get": {
            "summary": "Tail SAGA_LOG: the newest rows, or the rows after an id",
            "parameters": [
                {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                              "maximum": 2 ** 62}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            ],
            "responses": answers(_200=("LogList", "log rows, oldest first"), _400=("error", ""),
                                 _503=("error", "")),
        }},
        "/faults": {"get": {
            "summary": "Each service's failure-simulation setting",
            "responses": {"200": json_body({"type": "object", "additionalProperties": {"type": "object"}})},
        }},
        "/faults/{service}": {"put": {
            "summary": "Change one service's failure simulation",
            "parameters": [{"name": "service", "in": "path", "required": True,
                            "schema": {"type": "string"}}], **OPERATOR,
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref("Fault")}}},
            "responses": answers(_200=("FaultState", "the new setting"), _400=("error", ""),
                                 _401=("error", ""), _404=("error", ""), _413=("error", ""),
                                 _415=("error", ""), _502=("error", "")),
        }},
        "/health": {"get": {
            "summary": "This process and its database (add ?all=1 for the services)",
            "responses": answers(_200=("Health", "can serve"), _503=("Health", "database down")),
        }},
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": json_body({"type": "object"})}}},
        "/": {"get": {"summary": "ui.html, the live monitor", "responses": {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "SAGA_API_TOKEN, when it is set"}},
        "schemas": {
            "StartRequest": {"type": "object", "additionalProperties": False,
                             "required": ["username", "address", "payment"],
                             "properties": {"username": TEXT, "address": TEXT, "payment": TEXT}},
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string"}, "field": {"type": "string"}}},
            "SagaAnswer": {"type": "object", "required": ["saga", "status"], "properties": {
                "saga": {"type": "string"}, "status": {"enum": STATUSES},
                "failed_step": NULLABLE_TEXT, "reason": NULLABLE_TEXT,
                "results": {"type": "object"}}},
            "SagaItem": {"type": "object", "required": [
                "id", "status", "current_step", "attempt", "username", "created_at", "updated_at"],
                "properties": {
                    "id": {"type": "string"}, "status": {"enum": STATUSES},
                    "current_step": {"enum": ["A", "B", "C"]}, "attempt": {"type": "integer"},
                    "username": {"type": "string"}, "failed_step": NULLABLE_TEXT,
                    "reason": NULLABLE_TEXT, "created_at": {"type": "string"},
                    "updated_at": {"type": "string"}}},
            "SagaList": {"type": "object", "required": ["sagas", "limit", "offset", "next_offset"],
                         "properties": {"sagas": {"type": "array", "items": ref("SagaItem")},
                                        "limit": {"type": "integer"}, "offset": {"type": "integer"},
                                        "next_offset": {"type": ["integer", "null"]}}},
            "StepOutcome": {"type": "object", "required": ["status", "attempts"], "properties": {
                "status": {"type": "string"}, "attempts": {"type": "integer"},
                "http_status": {"type": ["integer", "null"]},
                "elapsed_ms": {"type": ["integer", "null"]}, "message": NULLABLE_TEXT}},
            "SagaDetail": {"allOf": [ref("SagaItem"), {"type": "object", "required": [
                "input", "results", "steps", "log"], "properties": {
                "input": ref("StartRequest"), "results": {"type": "object"},
                "rejected": {"type": "boolean"},
                "steps": {"type": "array", "items": {"type": "object", "required": ["service"],
                          "properties": {"service": {"type": "string"},
                                         "invoke": ref("StepOutcome"),
                                         "compensate": ref("StepOutcome")}}},
                "log": {"type": "array", "items": ref("LogRow")}}}]},
            "LogRow": {"type": "object", "required": ["id", "saga_id", "service", "status", "created_at"],
                       "properties": {
                           "id": {"type": "integer"}, "saga_id": {"type": "string"},
                           "service": {"type": "string"}, "status": {"type": "string"},
                           "message": NULLABLE_TEXT, "created_at": {"type": "string"},
                           "step": {"type": ["integer", "null"]},
                           "action": {"enum": ["invoke", "compensate", None]},
                           "attempt": {"type": ["integer", "null"]},
                           "http_status": {"type": ["integer", "null"]},
                           "elapsed_ms": {"type": ["integer", "null"]}}},
            "LogList": {"type": "object", "required": ["log"], "properties": {
                "log": {"type": "array", "items": ref("LogRow")}}},
            "Fault": {"type": "object", "additionalProperties": False, "properties": {
                "mode": {"enum": ["off", "fail", "reject", "drop", "crash", "hang", "slow"]},
                "every": {"type": "integer", "minimum": 1, "maximum": 1000000},
                "rate": {"type": "number", "minimum": 0, "maximum": 1},
                "next": {"type": "integer", "minimum": 0, "maximum": 1000000},
                "seconds": {"type": "number", "minimum": 0, "maximum": 300},
                "on": {"enum": ["invoke", "compensate", "both"]}}},
            "FaultState": {"type": "object", "required": ["fault", "calls"], "properties": {
                "fault": {"type": "object"}, "calls": {"type": "integer"}}},
            "Health": {"type": "object", "required": ["status", "database"], "properties": {
                "service": {"type": "string"}, "status": {"enum": ["ok", "degraded"]},
                "database": {"enum": ["up", "down"]}, "owner": {"type": "string"},
                "active_sagas": {"type": "integer"}, "services": {"type": "object"}}},
        },
    },
}
