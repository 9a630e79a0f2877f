"""The UI plugin's FastAPI app, mounted by Airflow's API server at ``<base_url>mlops/``.

- ``api/...``: the JSON the React pages read (``docs/ui.md``, "API"); a model is shown to a user only when
  Airflow's auth manager lets them read every DAG of the model;
- ``reports/<path>`` (and the former ``artifacts/<path>``): files tasks wrote to the artifact store,
  authorized per DAG (the first folder is the DAG id), served so that their scripts cannot act on
  Airflow's origin (a ``Content-Security-Policy: sandbox`` makes the page an opaque origin); symlinks and
  anything outside the artifact root are refused;
- ``ui/main.js``: the React bundle built into ``airflow_mlops/plugins/ui/dist``.

Built only when the API server asks for the plugin's apps (see :mod:`airflow_mlops.plugins.mlops_plugin`):
this module imports the API server's security code.
"""

from __future__ import annotations

import html
import logging
import mimetypes
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from airflow_mlops.artifacts import ArtifactStore, is_local
from airflow_mlops.exceptions import MLOpsError
from airflow_mlops.plugins.views import DagLister, ModelViews

log = logging.getLogger(__name__)

#: the folder of the built React bundle
UI_DIST = Path(__file__).parent / "ui" / "dist"

#: headers of every report: no script of it may reach Airflow's origin (sandbox without
#: allow-same-origin: an opaque origin, no cookies, no same-origin requests), nothing loaded from elsewhere
REPORT_CSP = (
    "sandbox allow-scripts allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
    "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)
REPORT_HEADERS = {
    "Content-Security-Policy": REPORT_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "private, no-cache",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: media types served as such (anything else is a download)
INLINE_TYPES = {
    "text/html",
    "text/plain",
    "text/csv",
    "application/json",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    "image/gif",
}
NO_BUNDLE = (
    "The MLOps pages' JavaScript bundle is not built ({path} is missing): run `make install` in the "
    "airflow-mlops clone (it runs npm in airflow_mlops/plugins/ui), or install a released package."
)


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def may(user: Any, dag_ids: Iterable[str], method: str = "GET") -> bool:
    """Whether Airflow's auth manager lets ``user`` do ``method`` on every DAG of ``dag_ids`` (no DAG
    known: on all DAGs)."""
    wanted = set(dag_ids)
    manager = _auth_manager()
    if not wanted:
        return bool(manager.is_authorized_dag(method=method, user=user))
    return manager.filter_authorized_dag_ids(dag_ids=wanted, user=user, method=method) == wanted


def existing_dags(dag_ids: Iterable[str]) -> set[str]:
    """The DAG ids among ``dag_ids`` that Airflow knows (its metadata database)."""
    wanted = set(dag_ids)
    if not wanted:
        return set()
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return set(session.scalars(select(DagModel.dag_id).where(DagModel.dag_id.in_(wanted))))


def create_app(dag_lister: DagLister | None = None) -> FastAPI:
    """A new app of the plugin.

    :param dag_lister: which DAG ids exist in Airflow; default: Airflow's metadata database.
    """
    app = FastAPI(title="airflow-mlops", docs_url=None, redoc_url=None, openapi_url=None)
    lister = dag_lister or existing_dags
    user_dep = Depends(get_user)

    @app.exception_handler(MLOpsError)
    def _unavailable(_request: Any, err: MLOpsError) -> JSONResponse:
        # the state database or the artifact store cannot be read: say which and what to do, not a bare 500
        log.warning("MLOps UI API: %s", err)
        return JSONResponse(status_code=503, content={"detail": err.problem, "fix": err.fix})

    def views() -> ModelViews:
        return ModelViews(dag_lister=lister)

    def visible_model(name: str, user: Any) -> tuple[ModelViews, dict[str, Any], dict[str, str]]:
        v = views()
        index = v.index(name)
        if index is None:
            raise HTTPException(status_code=404, detail=f"no model {name!r} in the registry")
        dag_ids = v.dag_ids(name, index)
        if not may(user, dag_ids.values()):
            raise HTTPException(status_code=403, detail=f"you may not read the DAGs of model {name!r}")
        return v, index, dag_ids

    # ------------------------------------------------------------------ JSON API
    @app.get("/api/models")
    def models(user: Any = user_dep) -> dict[str, Any]:
        v = views()
        out = []
        for name in v.model_names():
            summary = v.model_summary(name, v.hook.read_index(name))
            dags = summary["dag_ids"].values()
            if not may(user, dags):
                continue
            summary["can_edit"] = may(user, dags, "PUT")
            out.append(summary)
        return {"models": out}

    @app.get("/api/models/{name}")
    def model(name: str, user: Any = user_dep) -> dict[str, Any]:
        v, index, dag_ids = visible_model(name, user)
        return {
            **v.model_detail(name, index),
            "dag_ids": dag_ids,
            "can_edit": may(user, dag_ids.values(), "PUT"),
        }

    @app.get("/api/models/{name}/trials")
    def trials(name: str, run_id: str | None = None, user: Any = user_dep) -> dict[str, Any]:
        v, index, _ = visible_model(name, user)
        found = v.trials(name, index, run_id)
        if found is None:
            raise HTTPException(
                status_code=404,
                detail=f"no tuning result of model {name!r}"
                + (f" in run {run_id!r}" if run_id else " (no registered version names a tuning run)"),
            )
        return found

    @app.get("/api/models/{name}/drift")
    def drift(name: str, user: Any = user_dep) -> dict[str, Any]:
        v, _, _ = visible_model(name, user)
        return v.drift(name)

    @app.get("/api/models/{name}/validation")
    def validation(name: str, user: Any = user_dep) -> dict[str, Any]:
        v, _, dag_ids = visible_model(name, user)
        return v.validation(set(dag_ids.values()))

    @app.get("/api/runs/{dag_id}/{run_id}")
    def run(dag_id: str, run_id: str, user: Any = user_dep) -> dict[str, Any]:
        if not may(user, [dag_id]):
            raise HTTPException(status_code=403, detail=f"you may not read DAG {dag_id!r}")
        return views().run(dag_id, run_id)

    @app.get("/api/tasks/{dag_id}/{run_id}/{task_id}")
    def task(
        dag_id: str, run_id: str, task_id: str, map_index: int = Query(-1), user: Any = user_dep
    ) -> dict[str, Any]:
        if not may(user, [dag_id]):
            raise HTTPException(status_code=403, detail=f"you may not read DAG {dag_id!r}")
        return views().task(dag_id, run_id, task_id, map_index)

    # ------------------------------------------------------------------ reports
    def serve_report(relative: str, user: Any, prefix: str) -> Response:
        parts = [p for p in relative.split("/") if p]
        if any(p in (".", "..") or "\\" in p or "\x00" in p for p in parts):
            raise HTTPException(status_code=400, detail="'.', '..' and '\\' are not allowed in report paths")
        store = ArtifactStore()
        if parts:
            dag_id = parts[0]
            if lister([dag_id]):
                allowed = may(user, [dag_id])
            else:  # not a DAG's folder (registry exports, drift references): only who may read every DAG
                allowed = may(user, [])
            if not allowed:
                raise HTTPException(status_code=403, detail=f"you may not read the artifacts of {dag_id!r}")
        target = _resolve(store, parts)
        if target.is_dir():
            if parts and not relative.endswith("/"):  # the listing's links are relative to the folder
                return RedirectResponse(url=f"{parts[-1]}/", status_code=307)
            return _listing(store, target, parts, user, prefix, lister)
        if not target.exists():
            raise HTTPException(status_code=404, detail=f"no report at {relative!r}")
        media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        headers = dict(REPORT_HEADERS)
        if media_type not in INLINE_TYPES:
            headers["Content-Disposition"] = "attachment"
        if media_type.startswith("text/") or media_type in ("application/json", "image/svg+xml"):
            media_type += "; charset=utf-8" if media_type != "image/svg+xml" else ""
        return Response(content=target.read_bytes(), media_type=media_type, headers=headers)

    @app.get("/reports/{relative:path}")
    def reports(relative: str = "", user: Any = user_dep) -> Response:
        return serve_report(relative, user, "reports")

    @app.get("/artifacts/{relative:path}")
    def artifacts(relative: str = "", user: Any = user_dep) -> Response:
        return serve_report(relative, user, "artifacts")

    # ------------------------------------------------------------------ the React bundle
    @app.get("/ui/{name}")
    def bundle(name: str) -> Response:
        if name != "main.js":
            raise HTTPException(status_code=404, detail="the plugin serves only ui/main.js")
        path = UI_DIST / "main.js"
        if not path.is_file():
            return JSONResponse(status_code=404, content={"detail": NO_BUNDLE.format(path=path)})
        return Response(
            content=path.read_bytes(),
            media_type="text/javascript; charset=utf-8",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    return app


def _resolve(store: ArtifactStore, parts: list[str]) -> Any:
    """The artifact at ``parts`` under the root; refuses symlinks and anything that resolves outside."""
    root = store.root
    target = root.joinpath(*parts) if parts else root
    if not is_local(root):
        return target
    local_root = Path(root.path).resolve()
    current = local_root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise HTTPException(status_code=403, detail="symbolic links in the artifact store are not served")
    resolved = current.resolve()
    if resolved != local_root and local_root not in resolved.parents:
        raise HTTPException(status_code=403, detail="the path leaves the artifact root")
    return target


def _listing(
    store: ArtifactStore, target: Any, parts: list[str], user: Any, prefix: str, lister: DagLister
) -> HTMLResponse:
    entries = sorted(target.iterdir(), key=lambda p: p.name)
    names = [(p.name, p.is_dir()) for p in entries if not p.name.startswith(".")]
    if not parts:  # the root: the DAG folders the user may read (the rest only for who may read all)
        everything = may(user, [])
        dags = lister(n for n, _ in names)
        readable = (
            set(_auth_manager().filter_authorized_dag_ids(dag_ids=dags, user=user, method="GET"))
            if dags
            else set()
        )
        names = [(n, d) for n, d in names if n in readable or (everything and n not in dags)]
    here = "/".join(parts)
    # relative links: the listing works under any [api] base_url
    items = "".join(
        f'<li><a href="{html.escape(name)}{"/" if is_dir else ""}">{html.escape(name)}{"/" if is_dir else ""}</a></li>'
        for name, is_dir in names
    )
    up = '<p><a href="../">..</a></p>' if parts else ""
    body = f"<!DOCTYPE html><title>{html.escape(prefix)}/{html.escape(here)}</title><h1>Reports: /{html.escape(here)}</h1>{up}<ul>{items}</ul>"
    return HTMLResponse(body, headers=dict(REPORT_HEADERS))
