"""A property-based fuzz of the HTTP API from its own OpenAPI schema (schemathesis), over a real socket:
no request the schema allows may get a 5xx, an undocumented status, or a body unlike the schema."""

import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

import alignsearch
from alignsearch.surfaces.cli import main
from alignsearch.surfaces.server import ServerConfig, start_in_thread


@pytest.fixture(scope="module")
def api_server(tmp_path_factory, tiny_model):
    from conftest import make_images

    base = tmp_path_factory.mktemp("fuzz")
    make_images(base / "corpus", 6)
    ix = base / "ix"
    result = CliRunner().invoke(main, ["index", str(base / "corpus"), "--index", str(ix), "--model", str(tiny_model),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    engine = alignsearch.open(ix, device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0))
    yield server
    server.shutdown()
    engine.close()


@pytest.mark.slow
def test_api_answers_as_its_schema_says(api_server):
    """Every operation in /openapi.json, a dozen generated requests each (schemathesis strategies driven by
    hypothesis here, since its pytest plugin does not load under this pytest)."""
    schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/search", "/api/image/{file_id}", "/api/info", "/api/recent", "/healthz"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(
                headers={"Authorization": f"Bearer {api_server.token}"},
                checks=[checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                        checks.response_schema_conformance],
            )

        fuzz()
