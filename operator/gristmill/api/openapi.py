"""The OpenAPI 3.1 document of the HTTP API, served at /api/v1/openapi.json.

Written by hand next to the routes (api/app.py ROUTES); tests keep the two equal and run
schemathesis against a live server with it, so what it says is what the API does.
"""

from __future__ import annotations

import copy
from typing import Any

from gristmill.api import idempotency, listing, params, run_labels
from gristmill.store.audit import AuditAction
from gristmill.store.run_listing import RunKind, RunStatus

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_NULLABLE_ID = {"type": ["string", "null"], "format": "uuid"}
_RUN_STATUS = {"type": "string",
               "enum": ["queued", "running", "succeeded", "failed", "cancelled"]}
# Text that is stored: PostgreSQL holds no NUL character.
_TEXT = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": "^[^\\u0000]*$"}
_ERROR_VALUE = {"type": ["object", "null"],
                "description": "What went wrong: kind, message and, in a flow, step."}
_LABELS = {"type": "object", "maxProperties": run_labels.MAX_LABELS,
           "additionalProperties": {"type": "string", "maxLength": 63},
           "description": "Kubernetes-style labels (keys such as team or example.com/team, "
                          "values of up to 63 letters, digits, '-', '_' or '.'); the run "
                          "listing filters by them (label=KEY=VALUE)"}
# What listing.time_param takes: an RFC 3339 time, or a duration (spec.parse_duration).
_TIME_OR_DURATION = {"anyOf": [
    {"type": "string", "format": "date-time"},
    {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$|^[0-9]+(\.[0-9]+)?$"},
]}


def _page_of(item_schema: str) -> dict[str, Any]:
    """A listing page: its items and the cursor of the next page."""
    return {
        "type": "object",
        "properties": {"items": {"type": "array",
                                 "items": {"$ref": f"#/components/schemas/{item_schema}"}},
                       "next": {"type": ["string", "null"],
                                "description": "The cursor of the next page (null on the "
                                               "last page)"}},
        "required": ["items", "next"],
        "additionalProperties": False,
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every error: what is wrong and how to fix it.",
        "properties": {
            "error": {"type": "string"},
            "field": {"type": "string", "description": "The request field at fault, such "
                                                       "as input.items[3]"},
        },
        "required": ["error"],
        "additionalProperties": False,
    },
    "ScriptRunRequest": {
        "type": "object",
        "properties": {
            "input": {"type": "object", "description": "Checked against the Script's input "
                                                       "schema (status.inputSchema)"},
            "priority": {"type": "integer", "minimum": -100, "maximum": 100,
                         "description": "Default: the Script's"},
            "scheduledFor": {"type": "string", "format": "date-time",
                             "description": "Not before this time (1970 to 2999)"},
            "labels": _LABELS,
        },
        "additionalProperties": False,
    },
    "FlowRunRequest": {
        "type": "object",
        "properties": {
            "input": {"type": "object", "description": "Checked against the Flow's "
                                                       "spec.input"},
            "priority": {"type": "integer", "minimum": -100, "maximum": 100},
            "labels": _LABELS,
        },
        "additionalProperties": False,
    },
    "ScriptRunBatchRequest": {
        "type": "object",
        "properties": {"runs": {"type": "array", "minItems": 1, "maxItems": 1000,
                                "items": {"$ref": "#/components/schemas/ScriptRunRequest"},
                                "description": "Each checked as a single submit's body; one "
                                               "at fault refuses them all (the message "
                                               "names it: runs[7])"}},
        "required": ["runs"],
        "additionalProperties": False,
    },
    "FlowRunBatchRequest": {
        "type": "object",
        "properties": {"runs": {"type": "array", "minItems": 1, "maxItems": 1000,
                                "items": {"$ref": "#/components/schemas/FlowRunRequest"}}},
        "required": ["runs"],
        "additionalProperties": False,
    },
    "SubmittedRuns": {
        "type": "object",
        "properties": {"runs": {"type": "array",
                                "items": {"$ref": "#/components/schemas/SubmittedRun"},
                                "description": "In the order of the request's runs"}},
        "required": ["runs"],
        "additionalProperties": False,
    },
    "SubmittedRun": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "kind": {"type": "string", "enum": ["script", "flow"]},
            "status": _RUN_STATUS,
        },
        "required": ["id", "kind", "status"],
        "additionalProperties": False,
    },
    "ScriptRun": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "kind": {"const": "script"},
            "namespace": {"type": "string"},
            "script": {"type": ["string", "null"]},
            "version": {"type": ["string", "null"]},
            "tag": {"type": "string"},
            "priority": {"type": "integer"},
            "status": _RUN_STATUS,
            "labels": {"type": "object"},
            "input": {"type": "object"},
            "result": {"description": "The Script's result (any JSON value)"},
            "error": _ERROR_VALUE,
            "attempts": {"type": "integer"},
            "maxAttempts": {"type": ["integer", "null"]},
            "worker": {"type": ["string", "null"]},
            "createdAt": {"type": "string", "format": "date-time"},
            "scheduledFor": _NULLABLE_TIME,
            "startedAt": _NULLABLE_TIME,
            "finishedAt": _NULLABLE_TIME,
            "durationMs": {"type": ["number", "null"]},
        },
        "required": ["id", "kind", "namespace", "status", "input", "createdAt"],
        "additionalProperties": False,
    },
    "Step": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "path": {"type": "string", "description": "The step id with loop indices, such "
                                                      "as price_one[3]"},
            "status": {"type": "string", "enum": ["sleeping", "running", "suspended",
                                                  "succeeded", "failed", "skipped",
                                                  "cancelled"]},
            "result": {},
            "error": _ERROR_VALUE,
            "attempts": {"type": ["integer", "null"]},
            "job": _NULLABLE_ID,
            "childRun": _NULLABLE_ID,
            "approvedBy": {"type": ["string", "null"],
                           "description": "Who approved this suspended step (the "
                                          "authenticated username)"},
            "startedAt": _NULLABLE_TIME,
            "finishedAt": _NULLABLE_TIME,
            "durationMs": {"type": ["number", "null"]},
            "steps": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}},
        },
        "required": ["id", "path", "status", "steps"],
        "additionalProperties": False,
    },
    "FlowRun": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "kind": {"const": "flow"},
            "namespace": {"type": "string"},
            "flow": {"type": "string"},
            "version": {"type": "string"},
            "priority": {"type": "integer"},
            "status": _RUN_STATUS,
            "labels": {"type": "object"},
            "input": {"type": "object"},
            "result": {},
            "error": _ERROR_VALUE,
            "parentRun": _NULLABLE_ID,
            "restartedFrom": _NULLABLE_ID,
            "createdAt": {"type": "string", "format": "date-time"},
            "startedAt": _NULLABLE_TIME,
            "finishedAt": _NULLABLE_TIME,
            "durationMs": {"type": ["number", "null"]},
            "steps": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}},
        },
        "required": ["id", "kind", "namespace", "flow", "status", "input", "steps"],
        "additionalProperties": False,
    },
    "Run": {
        "oneOf": [{"$ref": "#/components/schemas/ScriptRun"},
                  {"$ref": "#/components/schemas/FlowRun"}],
    },
    "Cancellation": {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"},
                       "status": {"type": "string", "enum": ["cancelled", "cancelling"]}},
        "required": ["id", "status"],
        "additionalProperties": False,
    },
    "DecisionRequest": {
        "type": "object",
        "properties": {
            "step": {**_TEXT, "description": "The suspended step's path, when several wait"},
        },
        "additionalProperties": False,
    },
    "Decision": {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"},
                       "step": {"type": "string"},
                       "decision": {"type": "string", "enum": ["approved", "rejected"]}},
        "required": ["id", "step", "decision"],
        "additionalProperties": False,
    },
    "RestartRequest": {
        "type": "object",
        "properties": {"fromStep": {**_TEXT, "description": "A top-level step id"}},
        "required": ["fromStep"],
        "additionalProperties": False,
    },
    "RestartedRun": {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"},
                       "kind": {"const": "flow"},
                       "status": _RUN_STATUS,
                       "restartedFrom": {"type": "string", "format": "uuid"}},
        "required": ["id", "kind", "status", "restartedFrom"],
        "additionalProperties": False,
    },
    "RunSummary": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "kind": {"type": "string", "enum": [str(k) for k in RunKind]},
            "namespace": {"type": "string"},
            "name": {"type": ["string", "null"], "description": "The Script or Flow"},
            "status": _RUN_STATUS,
            "labels": {"type": "object"},
            "createdAt": {"type": "string", "format": "date-time"},
            "startedAt": _NULLABLE_TIME,
            "finishedAt": _NULLABLE_TIME,
            "durationMs": {"type": ["number", "null"]},
        },
        "required": ["id", "kind", "namespace", "name", "status", "labels", "createdAt"],
        "additionalProperties": False,
    },
    "RunList": _page_of("RunSummary"),
    "AuditEntry": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "at": {"type": "string", "format": "date-time"},
            "namespace": {"type": "string"},
            "user": {"type": "object",
                     "properties": {"username": {"type": "string"}, "uid": {"type": "string"},
                                    "groups": {"type": "array", "items": {"type": "string"}}},
                     "required": ["username", "uid", "groups"],
                     "additionalProperties": False},
            "action": {"type": "string", "enum": [str(a) for a in AuditAction]},
            "run": _NULLABLE_ID,
            "target": {"type": ["string", "null"], "description": "The Script or Flow"},
            "source": {"type": "string", "description": "The client's address"},
            "detail": {"type": "object", "description": "A few facts of the change: the "
                                                        "step decided, the new run"},
        },
        "required": ["id", "at", "namespace", "user", "action", "run", "target", "source",
                     "detail"],
        "additionalProperties": False,
    },
    "AuditList": _page_of("AuditEntry"),
    "Definitions": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"namespace": {"type": "string"}, "name": {"type": "string"},
                           "version": {"type": "string", "description": "Content hash"},
                           "updatedAt": {"type": "string", "format": "date-time"}},
            "required": ["namespace", "name", "version", "updatedAt"],
            "additionalProperties": False,
        },
    },
    "Health": {
        "type": "object",
        "properties": {"status": {"const": "ok"}},
        "required": ["status"],
        "additionalProperties": False,
    },
    "Readiness": {
        "type": "object",
        "properties": {"status": {"type": "string"},
                       "database": {"type": "string"},
                       "notifications": {"type": "string", "enum": ["listening",
                                                                    "reconnecting"]}},
        "required": ["status", "database", "notifications"],
        "additionalProperties": False,
    },
}

_NAME = {"type": "string", "pattern": params.NAME_PATTERN, "maxLength": params.NAME_MAX_LENGTH}

PARAMETERS: dict[str, Any] = {
    "namespace": {"name": "namespace", "in": "path", "required": True, "schema": _NAME,
                  "description": "The namespace (tenant)", "example": "default"},
    "scriptName": {"name": "name", "in": "path", "required": True, "schema": _NAME,
                   "description": "The Script's name", "example": "hello"},
    "flowName": {"name": "name", "in": "path", "required": True, "schema": _NAME,
                 "description": "The Flow's name", "example": "process-orders"},
    "runId": {"name": "id", "in": "path", "required": True,
              "schema": {"type": "string", "format": "uuid"}, "description": "A run id"},
    "follow": {"name": "follow", "in": "query", "required": False,
               "schema": {"type": "boolean", "default": False},
               "description": "Stream until the run ends (or the client leaves); also 1/0"},
    "after": {"name": "after", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 0, "maximum": params.MAX_SEQ,
                         "default": 0},
              "description": "Only log chunks after this sequence number"},
    "scriptFilter": {"name": "script", "in": "query", "required": False, "schema": _NAME,
                     "description": "Only runs of this Script"},
    "flowFilter": {"name": "flow", "in": "query", "required": False, "schema": _NAME,
                   "description": "Only runs of this Flow"},
    "kindFilter": {"name": "kind", "in": "query", "required": False,
                   "schema": {"type": "string", "enum": [str(k) for k in RunKind]},
                   "description": "Only Script runs or only Flow runs"},
    "statusFilter": {"name": "status", "in": "query", "required": False,
                     "schema": {"type": "array", "maxItems": len(RunStatus),
                                "items": {"type": "string", "enum": [
                                    str(s) for s in RunStatus]}},
                     "style": "form", "explode": True,
                     "description": "Only runs in these statuses (repeat it, or give a comma "
                                    "list: status=failed,cancelled)"},
    "since": {"name": "since", "in": "query", "required": False, "schema": _TIME_OR_DURATION,
              "description": "Only what happened at or after this: an RFC 3339 time, or a "
                             "duration ago (30m, 1h, 7d)", "example": "1h"},
    "until": {"name": "until", "in": "query", "required": False, "schema": _TIME_OR_DURATION,
              "description": "Only what happened before this (a time or a duration ago)"},
    "labelFilter": {"name": "label", "in": "query", "required": False,
                    "schema": {"type": "array", "maxItems": run_labels.MAX_LABELS, "items": {
                        "type": "string", "maxLength": 317,
                        "pattern": r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
                                   r"=([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"}},
                    "style": "form", "explode": True,
                    "description": "KEY=VALUE: only runs with this label (repeat it: all of "
                                   "them)", "example": ["team=payments"]},
    "limit": {"name": "limit", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": listing.MAX_LIMIT,
                         "default": listing.DEFAULT_LIMIT},
              "description": "Items per page"},
    "cursor": {"name": "cursor", "in": "query", "required": False,
               "schema": {"type": "string", "maxLength": 512},
               "description": "The `next` of the previous page, with the same filters "
                              "(opaque: any other value is a 400)"},
    "actionFilter": {"name": "action", "in": "query", "required": False,
                     "schema": {"type": "array", "maxItems": len(AuditAction),
                                "items": {"type": "string", "enum": [
                                    str(a) for a in AuditAction]}},
                     "style": "form", "explode": True,
                     "description": "Only these actions (repeat it, or a comma list)"},
    "userFilter": {"name": "user", "in": "query", "required": False,
                   "schema": {"type": "string", "minLength": 1,
                              "maxLength": listing.MAX_USERNAME},
                   "description": "Only what this user did (the authenticated username)"},
    "runFilter": {"name": "run", "in": "query", "required": False,
                  "schema": {"type": "string", "format": "uuid"},
                  "description": "Only changes to this run"},
    "namespaceFilter": {"name": "namespace", "in": "query", "required": False, "schema": _NAME,
                        "description": "Only this namespace"},
    "idempotencyKey": {
        "name": idempotency.HEADER, "in": "header", "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH,
                   "pattern": idempotency.KEY_PATTERN},
        "description": "Makes the submit safe to retry: the same key with the same body "
                       "gets the first response (and no second run) for 24 hours; with "
                       "another body, a 422. Scoped to the namespace and route.",
    },
}

_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"},
                                "description": "Seconds to wait before trying again"}}

_ERRORS = {
    "400": "The request is wrong; the message says what and how to fix it",
    "401": "No bearer token, or one that is not valid: the message says what to send",
    "403": "The caller may not do this (the message names the permission, as `kubectl auth "
           "can-i` asks it), or the request came from another site",
    "404": "No such run, Script or Flow",
    "409": "The request conflicts with the run's state",
    "413": "The request body is over 1 MiB (a batch: over 4 MiB)",
    "415": "The request body is not JSON in UTF-8",
    "422": "The Idempotency-Key was used with a different body",
    "500": "A bug: logged by the API with its traceback and a reference",
    "503": "The database or the Kubernetes API server (which checks credentials) is "
           "unavailable; retry after Retry-After seconds",
}


def _error(code: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERRORS[code],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if code == "401":
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"},
                                                    "description": "Bearer"}}
    if code in ("409", "503"):
        response["headers"] = _RETRY_AFTER if code == "503" else {
            "Retry-After": {**_RETRY_AFTER["Retry-After"],
                            "description": "Present when the same Idempotency-Key is still "
                                           "being served: repeat the request then"}}
    return response


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _body(schema: str, required: bool, example: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{schema}"}}
    if example is not None:
        media["example"] = example
    return {"required": required, "content": {"application/json": media}}


def _operation(operation_id: str, summary: str, responses: dict[str, Any],
               parameters: list[str] = (), errors: tuple[str, ...] = (),
               request_body: dict[str, Any] | None = None, open_route: bool = False,
               permission: str = "") -> dict[str, Any]:
    """`open_route`: no credentials needed; `permission`: what RBAC must allow (README,
    "Who may do what")."""
    if not open_route:
        errors = tuple(sorted({*errors, "401", "403", "503"}))
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [{"$ref": f"#/components/parameters/{p}"} for p in parameters],
        "responses": {**responses, **{code: _error(code) for code in (*errors, "500")}},
    }
    if open_route:
        operation["security"] = []
    if permission:
        operation["description"] = f"Needs: {permission}."
    if request_body is not None:
        operation["requestBody"] = request_body
    return operation


def _listing_operation(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """A listing's operation. Its filters repeat, so its request line can grow past the
    8190 bytes aiohttp's HTTP parser reads; that 400 comes from the parser, before the
    API sees the request, as text."""
    operation = _operation(*args, **kwargs)
    refused = copy.deepcopy(operation["responses"]["400"])
    refused["description"] += " (a request line over 8190 bytes: text from the HTTP server)"
    refused["content"]["text/plain"] = {"schema": {"type": "string"}}
    operation["responses"]["400"] = refused
    return operation


# What a client can do next with the id a submit returns (schemathesis follows these).
_RUN_LINKS = {
    name: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
    for name, operation in (("GetRun", "getRun"), ("GetRunLogs", "getRunLogs"),
                            ("CancelRun", "cancelRun"))
}
_FLOW_RUN_LINKS = {
    **_RUN_LINKS,
    **{name: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
       for name, operation in (("ApproveStep", "approveStep"), ("RejectStep", "rejectStep"),
                               ("RestartRun", "restartRun"))},
}

_WRITE_ERRORS = ("400", "404", "409", "413", "415", "503")
_SUBMIT_ERRORS = ("400", "404", "409", "413", "415", "422", "503")


def _submitted_batch() -> dict[str, Any]:
    return {"201": {
        **_json("The runs, queued, in order (or the first response again, for a repeated "
                "Idempotency-Key)", "SubmittedRuns"),
        "headers": {idempotency.REPLAYED_HEADER: {
            "schema": {"const": "true"},
            "description": "Present when this is the stored response to an earlier request "
                           "with the same Idempotency-Key"}},
    }}


def _submitted(links: dict[str, Any]) -> dict[str, Any]:
    return {"201": {
        **_json("The run, queued (or the first response again, for a repeated "
                "Idempotency-Key)", "SubmittedRun"),
        "headers": {idempotency.REPLAYED_HEADER: {
            "schema": {"const": "true"},
            "description": "Present when this is the stored response to an earlier request "
                           "with the same Idempotency-Key"}},
        "links": links,
    }}


_READ_RUN = "get on runs in the run's namespace (without it: 404, as for an unknown run)"
_ON_RUN = _READ_RUN.replace("get on runs", "get on runs and update on {}")
_DECIDE = (_ON_RUN.format("runs/approval") + "; and whatever the step's suspend.approvers "
           "and forbidSubmitter ask")
_LIST = ("list on {} in ?namespace=, or in all namespaces without it")

PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/namespaces/{namespace}/scripts/{name}/runs": {"post": _operation(
        "submitScriptRun", "Start a run of a Script", _submitted(_RUN_LINKS),
        ["namespace", "scriptName", "idempotencyKey"], _SUBMIT_ERRORS,
        _body("ScriptRunRequest", False, {"input": {"name": "world"}}),
        permission="create on scripts/runs (name: the Script) in the namespace")},
    "/api/v1/namespaces/{namespace}/flows/{name}/runs": {"post": _operation(
        "submitFlowRun", "Start a run of a Flow", _submitted(_FLOW_RUN_LINKS),
        ["namespace", "flowName", "idempotencyKey"], _SUBMIT_ERRORS,
        _body("FlowRunRequest", False, {"input": {"batch": "b-42", "count": 2}}),
        permission="create on flows/runs (name: the Flow) in the namespace")},
    "/api/v1/namespaces/{namespace}/scripts/{name}/runs:batch": {"post": _operation(
        "submitScriptRunBatch", "Start 1 to 1,000 runs of a Script in one transaction: all "
                                "of them, or none", _submitted_batch(),
        ["namespace", "scriptName", "idempotencyKey"], _SUBMIT_ERRORS,
        _body("ScriptRunBatchRequest", True,
              {"runs": [{"input": {"name": "a"}}, {"input": {"name": "b"}, "priority": 5}]}),
        permission="create on scripts/runs (name: the Script) in the namespace")},
    "/api/v1/namespaces/{namespace}/flows/{name}/runs:batch": {"post": _operation(
        "submitFlowRunBatch", "Start 1 to 1,000 runs of a Flow in one transaction: all of "
                              "them, or none", _submitted_batch(),
        ["namespace", "flowName", "idempotencyKey"], _SUBMIT_ERRORS,
        _body("FlowRunBatchRequest", True,
              {"runs": [{"input": {"batch": "b-42", "count": 2}}]}),
        permission="create on flows/runs (name: the Flow) in the namespace")},
    "/api/v1/namespaces/{namespace}/runs": {"get": _listing_operation(
        "listRuns", "A namespace's runs (Script runs and top-level Flow runs), newest first, "
                    "filtered and a page at a time",
        {"200": _json("A page of runs", "RunList")},
        ["namespace", "scriptFilter", "flowFilter", "kindFilter", "statusFilter", "since",
         "until", "labelFilter", "limit", "cursor"], ("400", "503"),
        permission="list on runs in the namespace")},
    "/api/v1/namespaces/{namespace}/audit": {"get": _listing_operation(
        "listAudit", "A namespace's audit trail: who submitted, cancelled, approved, "
                     "rejected or restarted which run, when and from where; newest first",
        {"200": _json("A page of audit entries", "AuditList")},
        ["namespace", "actionFilter", "userFilter", "runFilter", "since", "until", "limit",
         "cursor"], ("400", "503"), permission="list on audit in the namespace")},
    "/api/v1/runs/{id}": {"get": _operation(
        "getRun", "A run: status, result, error, timings; a flow run's steps as a tree",
        {"200": _json("The run", "Run")}, ["runId"], ("400", "404", "503"),
        permission=_READ_RUN)},
    "/api/v1/runs/{id}/logs": {"get": _operation(
        "getRunLogs", "A run's log as text; with follow, streamed until the run ends",
        {"200": {"description": "The log",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}},
        ["runId", "follow", "after"], ("400", "404", "503"), permission=_READ_RUN)},
    "/api/v1/runs/{id}/cancel": {"post": _operation(
        "cancelRun", "Cancel a run (queued jobs at once, running ones are signalled)",
        {"200": _json("Cancelled, or being cancelled", "Cancellation")}, ["runId"],
        ("400", "404", "409", "415", "503"), permission=_ON_RUN.format("runs/cancel"))},
    "/api/v1/runs/{id}/approve": {"post": _operation(
        "approveStep", "Approve a flow run's suspended step",
        {"200": _json("The decision", "Decision")}, ["runId"], _WRITE_ERRORS,
        _body("DecisionRequest", False), permission=_DECIDE)},
    "/api/v1/runs/{id}/reject": {"post": _operation(
        "rejectStep", "Reject a flow run's suspended step",
        {"200": _json("The decision", "Decision")}, ["runId"], _WRITE_ERRORS,
        _body("DecisionRequest", False), permission=_DECIDE)},
    "/api/v1/runs/{id}/restart": {"post": _operation(
        "restartRun", "Re-run a finished flow run from a top-level step, reusing the "
                      "results before it",
        {"201": _json("The new run", "RestartedRun")}, ["runId"], _WRITE_ERRORS,
        _body("RestartRequest", True, {"fromStep": "price"}),
        permission=_ON_RUN.format("runs/restart"))},
    "/api/v1/scripts": {"get": _operation(
        "listScripts", "The Scripts applied, with their current versions",
        {"200": _json("Scripts", "Definitions")}, ["namespaceFilter"], ("400", "503"),
        permission=_LIST.format("scripts"))},
    "/api/v1/flows": {"get": _operation(
        "listFlows", "The Flows applied, with their current versions",
        {"200": _json("Flows", "Definitions")}, ["namespaceFilter"], ("400", "503"),
        permission=_LIST.format("flows"))},
    "/api/v1/workers/connect": {"get": {
        **_operation(
            "connectWorker", "A WorkerGroup worker's WebSocket to the dispatcher (`gristmill "
                             "worker --server`): claims, outcomes, logs, cancellations",
            {"101": {"description": "Switching to the WebSocket protocol"}}, errors=("400",),
            permission="a worker token of a WorkerGroup (the Secret gristmill-worker-<group> "
                       "the operator writes), not a Kubernetes token"),
        "security": [{"workerToken": []}]}},
    "/api/v1/openapi.json": {"get": _operation(
        "getOpenApiDocument", "This document",
        {"200": {"description": "OpenAPI 3.1",
                 "content": {"application/json": {"schema": {"type": "object"}}}}})},
    "/healthz": {"get": _operation(
        "liveness", "Liveness: the process serves (it does not ask the database)",
        {"200": _json("Alive", "Health")}, open_route=True)},
    "/readyz": {"get": _operation(
        "readiness", "Readiness: the database answers",
        {"200": _json("Ready", "Readiness"),
         "503": {**_json("The database is unreachable", "Readiness"),
                 "headers": _RETRY_AFTER}}, open_route=True)},
    "/metrics": {"get": _operation(
        "metrics", "Prometheus metrics: queue depth, running jobs and oldest job age per "
                   "tag; log followers",
        {"200": {"description": "Prometheus text format",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}}, errors=("503",),
        open_route=True)},
}


def document() -> dict[str, Any]:
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "Gristmill API",
            "version": "v1",
            "description": "Submit Script and Flow runs, read them back, follow their logs. "
                           "Every error is JSON: {\"error\": \"what is wrong and how to fix "
                           "it\"}, with \"field\" when one field is at fault.",
        },
        "paths": PATHS,
        "security": [{"bearer": []}],
        "components": {"schemas": SCHEMAS, "parameters": PARAMETERS,
                       "securitySchemes": {"bearer": {
                           "type": "http", "scheme": "bearer",
                           "description": "A Kubernetes token (the kubeconfig's, or `kubectl "
                                          "create token`), checked with a TokenReview; under "
                                          "`gristmill dev`, its local token"},
                           "workerToken": {
                               "type": "http", "scheme": "bearer",
                               "description": "A WorkerGroup's worker token (gmw1....), "
                                              "signed by the operator"}}},
    })
