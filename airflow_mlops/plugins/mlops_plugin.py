"""The airflow-mlops UI plugin: an artifact browser served by the Airflow API server.

``/mlops/artifacts/`` lists and serves what runs wrote to the artifact store (validation reports, drift
reports, trial tables, plots), so extra links on task instances can open them in the browser. It is
read-only, requires a logged-in Airflow user, and never serves anything outside ``[mlops] artifact_root``.
"""

from __future__ import annotations

import functools
import html
import mimetypes
from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/mlops"


def artifact_url(uri: str) -> str | None:
    """The browser URL under which the plugin serves artifact ``uri`` (None when outside the root)."""
    from airflow_mlops.config import load_settings

    root = load_settings().artifact_root.rstrip("/") + "/"
    if not uri.startswith(root):
        return None
    return f"{URL_PREFIX}/artifacts/{uri[len(root) :]}"


@functools.cache
def served_app() -> Any:
    """The app the API server mounts, built once, when it asks for the plugin's apps.

    Not at import: every task process loads the plugins (for their listeners), and the app imports the
    API server's security module (~1.1 s of each task's start on a 2-core machine, measured in ``make
    demo``'s task logs between "Pre Execute" and "DAG bundles loaded").
    """
    return create_app()


def create_app() -> Any:
    """A new FastAPI app of the artifact browser."""
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    from airflow_mlops.artifacts import ArtifactStore

    app = FastAPI(title="airflow-mlops artifacts", dependencies=[Depends(get_user)])

    def _resolve(relative: str):
        parts = [p for p in relative.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise HTTPException(status_code=400, detail="'.' and '..' are not allowed in artifact paths")
        store = ArtifactStore()
        return store.root.joinpath(*parts) if parts else store.root

    @app.get("/artifacts/{relative:path}")
    def serve(relative: str = ""):
        path = _resolve(relative)
        if path.is_dir():
            entries = sorted(path.iterdir(), key=lambda p: p.name)
            base = f"{URL_PREFIX}/artifacts/{relative.strip('/')}".rstrip("/")
            items = "".join(
                f'<li><a href="{html.escape(base)}/{html.escape(p.name)}{"/" if p.is_dir() else ""}">'
                f"{html.escape(p.name)}{'/' if p.is_dir() else ''}</a></li>"
                for p in entries
                if not p.name.startswith(".")
            )
            return HTMLResponse(f"<h1>Artifacts: /{html.escape(relative)}</h1><ul>{items}</ul>")
        if not path.exists():
            raise HTTPException(status_code=404, detail=f"no artifact at {relative!r}")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(content=path.read_bytes(), media_type=media_type)

    return app


class MLOpsPlugin(AirflowPlugin):
    """Registers the artifact browser app and a menu entry for it."""

    name = "airflow_mlops"

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # a property: only the API server reads it (airflow.plugins_manager.get_fastapi_plugins)
        return [{"app": served_app(), "url_prefix": URL_PREFIX, "name": "MLOps artifacts"}]

    external_views = [
        {
            "name": "MLOps artifacts",
            "href": f"{URL_PREFIX}/artifacts/",
            "destination": "nav",
            "category": "browse",
        }
    ]
