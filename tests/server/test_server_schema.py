"""The API's OpenAPI schema: the committed copy is the app's, and a schema-driven fuzz over loopback
(Schemathesis, bounded in examples) gets no 5xx and only responses the schema describes."""
from __future__ import annotations

import json
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, settings

from uqcit.server.app import openapi_schema

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(COMMITTED)


def test_the_committed_schema_is_the_app_s():
    assert json.loads(COMMITTED.read_text()) == openapi_schema(), (
        "docs/openapi.json differs from the app's schema: regenerate it with "
        "`uqcit serve --openapi docs/openapi.json` and review the diff")


@SCHEMA.parametrize()
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate], derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, server):
    # Every check but positive_data_acceptance: a request can fit the schema and still be refused
    # (a model name that names no model, a recipe whose stages do not fit): 422 by design.
    case.call_and_validate(base_url=server.url, headers={"X-API-Key": server.key}, timeout=30,
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
