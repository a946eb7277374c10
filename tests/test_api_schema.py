"""The server's published OpenAPI schema, fuzzed with schemathesis on a tiny-model server: never a 5xx."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from test_serve import AUTH, app, serve_in_thread


@pytest.fixture(scope="module")
def served(trained_store):
    with serve_in_thread(app(trained_store, max_tokens=4)) as url:
        yield url


def test_no_request_gets_a_server_error(served):
    assert httpx.get(f"{served}/openapi.json").status_code == 401  # behind the key, as every route but /health
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {"POST /v1/completions",
                                                                    "POST /v1/chat/completions"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            for headers in (AUTH, {}):  # with the key and without it
                case.call_and_validate(base_url=served, headers=headers, checks=[not_a_server_error])

        check()
    metrics = httpx.get(f"{served}/metrics", headers=AUTH).text
    sent = sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("switchcit_requests_total{") and "/v1/" in line)
    assert sent >= 30 * 2  # the fuzzer really sent its cases
    assert 'status="500"' not in metrics
