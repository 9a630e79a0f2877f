"""The service's app without OpenTelemetry's per-request spans when no trace exporter is configured, but
with a request id for BentoML's ``X-BentoML-Request-ID`` header."""

from __future__ import annotations

import asyncio

from airflow_mlops.ml import service


def test_without_an_exporter_each_request_gets_an_id_and_no_span():
    seen: list[int | None] = []

    async def app(scope, receive, send):
        from bentoml._internal.context import trace_context

        seen.append(trace_context.request_id)

    middleware = service.TraceOnlyWhenExported(app)
    assert middleware.inner is None  # BentoML's default configuration exports no traces

    async def two_requests():
        for _ in range(2):
            await asyncio.create_task(middleware({"type": "http"}, None, None))

    asyncio.run(two_requests())
    assert len(seen) == 2 and all(seen) and seen[0] != seen[1]


def test_bentoml_builds_its_app_with_it():
    from opentelemetry.instrumentation import asgi

    assert asgi.OpenTelemetryMiddleware is service.TraceOnlyWhenExported
    assert service._OPENTELEMETRY_MIDDLEWARE.__module__.startswith("opentelemetry")


def test_with_an_exporter_it_is_opentelemetry_unchanged(monkeypatch):
    monkeypatch.setattr(service, "_tracing_exported", lambda: True)
    middleware = service.TraceOnlyWhenExported(lambda *a: None)
    assert isinstance(middleware.inner, service._OPENTELEMETRY_MIDDLEWARE)
