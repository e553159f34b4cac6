"""The OpenAPI 3.0 description of the HTTP API, served at /openapi.json.

Written by hand (Starlette has no schema generator worth the name), and kept honest by
tests/integration/test_http_api.py: every route the app serves must be described here, and
the document must validate against the OpenAPI 3.0 schema.
"""

from __future__ import annotations

from typing import Any

from callscribe.ids import ID_PATTERN, MAX_ID_LENGTH

Operation = dict[str, Any]

_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            }
        }
    },
}
_ID = {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$", "maxLength": MAX_ID_LENGTH}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_SDP = {"application/sdp": {"schema": {"type": "string"}}}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERROR for code in codes}


def _websocket(summary: str) -> Operation:
    # OpenAPI 3.0 has no websocket operations: a GET answered by 101 is the usual description.
    return {
        "summary": summary,
        "tags": ["forks"],
        "parameters": [
            {"name": "call_id", "in": "query", "required": False, "schema": _ID},
            {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}},
        ],
        "responses": {"101": {"description": "websocket accepted; media frames follow"}},
    }


LEG_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "required": ["call_id"],
    "properties": {
        "call_id": _ID,
        "leg": {**_ID, "default": "caller"},
        "codec": {"type": "string", "default": "pcmu", "example": "pcmu"},
        "meta": {"type": "object", "additionalProperties": True},
    },
}

OPERATIONS: dict[str, dict[str, Operation]] = {
    "/healthz": {
        "get": {
            "summary": "liveness",
            "tags": ["health"],
            "responses": {"200": {"description": "ok", "content": _TEXT}},
        }
    },
    "/readyz": {
        "get": {
            "summary": "readiness: Redis connected and the engine loaded",
            "tags": ["health"],
            "responses": {
                "200": {
                    "description": "ready",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "503": {
                    "description": "not ready",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "tags": ["health"],
            "responses": {"200": {"description": "text exposition format", "content": _TEXT}},
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "this document",
            "tags": ["health"],
            "responses": {"200": {"description": "OpenAPI 3.0 JSON", "content": {"application/json": {}}}},
        }
    },
    "/favicon.ico": {
        "get": {
            "summary": "the dashboard's icon",
            "tags": ["dashboard"],
            "responses": {"200": {"description": "SVG icon", "content": {"image/svg+xml": {}}}},
        }
    },
    "/v1/legs": {
        "post": {
            "summary": "reserve an RTP port for a leg and open it",
            "tags": ["legs"],
            "security": _BEARER,
            "requestBody": {"required": True, "content": {"application/json": {"schema": LEG_REQUEST}}},
            "responses": {
                "201": {
                    "description": "leg open; send RTP to rtp_host:rtp_port",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "leg_id": {"type": "string"},
                                    "rtp_host": {"type": "string"},
                                    "rtp_port": {"type": "integer"},
                                },
                            }
                        }
                    },
                },
                **_errors(400, 401, 403, 409, 503),
            },
        },
        "get": {
            "summary": "open legs",
            "tags": ["legs"],
            "security": _BEARER,
            "responses": {
                "200": {
                    "description": "open legs",
                    "content": {
                        "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}
                    },
                },
                **_errors(401, 403),
            },
        },
    },
    "/v1/legs/{leg_id}": {
        "delete": {
            "summary": "end a leg once its last final is published",
            "tags": ["legs"],
            "security": _BEARER,
            "parameters": [{"name": "leg_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "ended"}, **_errors(401, 403, 404)},
        }
    },
    "/whip": {
        "post": {
            "summary": "WHIP (RFC 9725): publish audio with an SDP offer",
            "tags": ["whip"],
            "security": _BEARER,
            "parameters": [
                {"name": "call_id", "in": "query", "required": False, "schema": _ID},
                {"name": "leg", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "requestBody": {"required": True, "content": _SDP},
            "responses": {
                "201": {
                    "description": "SDP answer; Location names the session",
                    "headers": {"Location": {"schema": {"type": "string"}}},
                    "content": _SDP,
                },
                **_errors(400, 401, 403, 409, 413, 415, 503),
            },
        },
        "options": {
            "summary": "WHIP capabilities (and CORS preflight)",
            "tags": ["whip"],
            "responses": {"204": {"description": "Accept-Post: application/sdp"}},
        },
    },
    "/whip/{session_id}": {
        "delete": {
            "summary": "hang up a WHIP session",
            "tags": ["whip"],
            "security": _BEARER,
            "parameters": [
                {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {"200": {"description": "ended"}, **_errors(401, 403, 404)},
        },
        "patch": {
            "summary": "trickle ICE: not supported (the answer holds every candidate)",
            "tags": ["whip"],
            "parameters": [
                {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": _errors(405),
        },
    },
    "/": {
        "get": {
            "summary": "live dashboard",
            "tags": ["dashboard"],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
        }
    },
    "/ui/{path}": {
        "get": {
            "summary": "dashboard and publish page assets",
            "tags": ["dashboard"],
            "parameters": [{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "a static file"}, "404": {"description": "no such file"}},
        }
    },
    "/events/calls": {
        "get": {
            "summary": "server-sent events of every call",
            "tags": ["dashboard"],
            "parameters": [
                {"name": "history_min", "in": "query", "required": False, "schema": {"type": "number"}}
            ],
            "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {}}}},
        }
    },
    "/events/calls/{call_id}": {
        "get": {
            "summary": "server-sent events of one call",
            "tags": ["dashboard"],
            "parameters": [{"name": "call_id", "in": "path", "required": True, "schema": _ID}],
            "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {}}}},
        }
    },
    "/supervisor": {
        "get": {
            "summary": "supervisor console: every active call in one grid",
            "tags": ["supervisor"],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
        }
    },
    "/supervisor/config": {
        "get": {
            "summary": "the supervisor page's settings (alert phrases)",
            "tags": ["supervisor"],
            "responses": {"200": {"description": "JSON", "content": {"application/json": {}}}},
        }
    },
    "/events/active": {
        "get": {
            "summary": "server-sent events of every active call, multiplexed on one stream",
            "tags": ["supervisor"],
            "parameters": [
                {"name": "history_min", "in": "query", "required": False, "schema": {"type": "number"}}
            ],
            "responses": {
                "200": {"description": "event stream", "content": {"text/event-stream": {}}},
                **_errors(400, 503),
            },
        }
    },
}

FORK_DIALECT_PATH = "/fork/{dialect}"


def openapi_document(version: str, fork_dialects: list[str]) -> dict[str, Any]:
    paths: dict[str, Any] = dict(OPERATIONS)
    for dialect in fork_dialects:
        paths[f"/fork/{dialect}"] = {"get": _websocket(f"websocket media fork, {dialect} dialect")}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "callscribe",
            "version": version,
            "description": "Live phone-call transcription bridge: ingest, health and the live dashboard. "
            "Transcripts themselves go to Redis Streams.",
        },
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
