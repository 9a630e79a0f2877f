"""What the UI plugin's JSON API answers, built from the registry, the recorded history and the artifact
store (the shapes are documented in ``docs/ui.md``; the FastAPI routes are in
:mod:`airflow_mlops.plugins.api`).

Nothing here knows about users: every function takes the names of the DAGs a model belongs to, and the
caller decides with Airflow's auth manager what the user may see.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from airflow_mlops.artifacts import ArtifactStore, safe_segment
from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError
from airflow_mlops.hooks.history import DRIFT_CHECKS, drift_checks, task_record, validations

log = logging.getLogger(__name__)

#: the stages of a lifecycle's DAGs, ``<dag_prefix>_<stage>`` (airflow_mlops.lifecycle.factory)
LIFECYCLE_STAGES = ("ingest", "features", "train", "monitor", "batch_scoring", "operate")
#: stage and history action of a candidate awaiting a person's approval (ModelApprovalOperator)
PENDING_APPROVAL = "pending_approval"
#: the task of the lifecycle's train DAG that asks for that approval
APPROVAL_TASK = "approval"
#: history actions that end (or suspend) a retraining
RETRAINING_ACTIONS = ("promote", "reject", PENDING_APPROVAL, "approve")
#: folder of the tuning operator's outputs under its task's artifact folder
TUNING_FOLDER = "tuning"

#: DAG ids that exist in Airflow, among the given ones
DagLister = Callable[[Iterable[str]], set[str]]


def report_path(uri: str | None, root: str) -> str | None:
    """The relative URL (``mlops/reports/<path>``) under which the plugin serves ``uri``; None when it
    is not under the artifact root."""
    if not uri:
        return None
    root = root.rstrip("/") + "/"
    if not str(uri).startswith(root):
        return None
    return f"mlops/reports/{str(uri)[len(root) :]}"


class ModelViews:
    """The API's answers, read from one state database and artifact store.

    :param dag_lister: which of the given DAG ids exist in Airflow (the lifecycle's DAGs of a model are
        only those that exist); default: all of them.
    """

    def __init__(self, hook: BentoMLHook | None = None, dag_lister: DagLister | None = None) -> None:
        self.hook = hook or BentoMLHook()
        self.store = ArtifactStore()
        self.root = self.store.settings.artifact_root
        self.dag_lister = dag_lister or (lambda ids: set(ids))

    # ------------------------------------------------------------------ model -> DAGs
    def model_names(self) -> list[str]:
        return self.hook.model_names()

    def index(self, name: str) -> dict[str, Any] | None:
        """The registry index of ``name``; None when the registry has no such model."""
        try:
            index = self.hook.read_index(name)
        except ModelRegistryError:  # not a model name at all
            return None
        if not index.get("versions") and name not in self.model_names():
            return None
        return index

    def dag_ids(
        self, name: str, index: dict[str, Any], checks: list[dict[str, Any]] | None = None
    ) -> dict[str, str]:
        """``{stage: dag_id}`` of the model (see docs/ui.md, "Which DAGs a model belongs to")."""
        found: dict[str, str] = {}
        records = sorted(index.get("versions", {}).values(), key=lambda r: r.get("registered_at") or "")
        train = next((r["dag_id"] for r in reversed(records) if r.get("dag_id")), None)
        if train:
            found["train"] = train
        checks = drift_checks(name, self.hook.state) if checks is None else checks
        if checks:
            found["monitor"] = checks[-1]["dag_id"]
        if train and train.endswith("_train"):
            prefix = train.removesuffix("_train")
            wanted = {f"{prefix}_{stage}": stage for stage in LIFECYCLE_STAGES}
            for dag_id in self.dag_lister(wanted):
                found.setdefault(wanted[dag_id], dag_id)
        return found

    # ------------------------------------------------------------------ models
    @staticmethod
    def _decisions(index: dict[str, Any]) -> list[dict[str, Any]]:
        versions = index.get("versions", {})
        out = []
        for entry in index.get("history", []):
            if entry.get("action") == "register":
                continue
            version = entry.get("version")
            record = versions.get(version) or {}
            out.append(
                {
                    "at": entry.get("at"),
                    "action": entry.get("action"),
                    "version": version,
                    "previous_production": entry.get("previous_production"),
                    "metric": entry.get("metric"),
                    "candidate_score": entry.get("candidate_score"),
                    "production_score": entry.get("production_score"),
                    # "gate": scored on the gate's holdout; "registration": a hand decision, which scores
                    # nothing new and carries the versions' registered (validation) scores
                    "scores_from": entry.get("scores_from")
                    or ("gate" if entry.get("candidate_score") is not None else None),
                    "reason": entry.get("reason"),
                    "user": entry.get("user"),
                    "dag_id": entry.get("dag_id")
                    or (record.get("dag_id") if entry.get("action") in ("promote", "reject") else None),
                    "run_id": entry.get("dag_run_id") or entry.get("run_id"),
                }
            )
        return out

    @staticmethod
    def _metric(index: dict[str, Any]) -> str | None:
        for entry in reversed(index.get("history", [])):
            if entry.get("metric"):
                return entry["metric"]
        records = sorted(index.get("versions", {}).values(), key=lambda r: r.get("registered_at") or "")
        for record in reversed(records):
            if record.get("metrics"):
                return next(iter(record["metrics"]))
        return None

    def _production(self, index: dict[str, Any], metric: str | None) -> dict[str, Any] | None:
        version = index.get("production")
        if not version:
            return None
        record = index.get("versions", {}).get(version) or {}
        score = None
        # the holdout score the gate measured (its promote/reject/pending/approve entries); decisions by hand
        # (operate DAG, rollback) carry the registered validation scores, marked scores_from=registration
        for decision in reversed(record.get("decisions") or []):
            if decision.get("candidate_score") is not None and decision.get("scores_from") != "registration":
                score = decision["candidate_score"]
                break
        if score is None and metric:
            score = (record.get("metrics") or {}).get(metric)
        return {"version": version, "score": score}

    def _serving(self, name: str) -> dict[str, Any] | None:
        """The deployment serving ``name``: its router URL, whether it answers and with which version."""
        deployments = self.hook.state.documents("deployment")
        state = deployments.get(name)
        if state is None:
            state = next(
                (s for s in deployments.values() if ((s.get("active") or {}).get("model") == name)), None
            )
        router = (state or {}).get("router") or {}
        if not state or not router.get("url"):
            return None
        ready, answering = False, None
        try:
            import httpx

            response = httpx.get(router["url"].rstrip("/") + "/__router__", timeout=1.0)
            if response.status_code == 200:
                status = response.json()
                answering = status.get("version")
                ready = bool(status.get("active")) and answering is not None
        except Exception as err:  # noqa: BLE001 -- a router that does not answer is "not ready", not an error
            log.info("Router of %s at %s does not answer: %s", name, router["url"], err)
        return {"url": router["url"], "ready": ready, "version_answering": answering}

    def _last_retraining(self, index: dict[str, Any], dag_ids: dict[str, str]) -> dict[str, Any] | None:
        """The last gate decision of a train run (``pending`` while a candidate awaits approval)."""
        decisions = [d for d in self._decisions(index) if d["action"] in RETRAINING_ACTIONS]
        if not decisions:
            return None
        last = decisions[-1]
        return {
            "dag_id": last["dag_id"] or dag_ids.get("train"),
            "run_id": last["run_id"],
            "at": last["at"],
            "decision": "pending" if last["action"] == PENDING_APPROVAL else last["action"],
            "reason": last["reason"],
            "version": last["version"],
            "user": last["user"],
        }

    @staticmethod
    def _last_check(checks: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not checks:
            return None
        last = checks[-1]
        quality = last.get("quality")
        return {
            "at": last.get("at"),
            "data_interval_start": last.get("data_interval_start"),
            "drifted": bool(last.get("drift_detected")),
            "drift_share": last.get("drift_share"),
            "quality": {k: quality.get(k) for k in ("metric", "value", "holdout", "decay", "max_decay")}
            if quality
            else None,
            "run_id": last.get("run_id"),
            "dag_id": last.get("dag_id"),
        }

    def model_summary(self, name: str, index: dict[str, Any]) -> dict[str, Any]:
        """One row of the Models page (without ``can_edit``, which depends on the user)."""
        checks = drift_checks(name, self.hook.state)
        dag_ids = self.dag_ids(name, index, checks)
        metric = self._metric(index)
        return {
            "name": name,
            "metric": metric,
            "dag_ids": dag_ids,
            "production": self._production(index, metric),
            "serving": self._serving(name),
            "last_drift_check": self._last_check(checks),
            "last_retraining": self._last_retraining(index, dag_ids),
        }

    def model_detail(self, name: str, index: dict[str, Any]) -> dict[str, Any]:
        """The model page's versions, decisions and pending approvals."""
        versions = []
        for record in sorted(
            index.get("versions", {}).values(), key=lambda r: r.get("registered_at") or "", reverse=True
        ):
            window = (record.get("training_manifest") or {}).get("time_range") or None
            versions.append(
                {
                    "version": record.get("version"),
                    "stage": record.get("stage"),
                    "metrics": record.get("metrics") or {},
                    "training_window": {"start": window.get("start"), "end": window.get("end")}
                    if window
                    else None,
                    "dag_id": record.get("dag_id"),
                    "run_id": record.get("dag_run_id"),
                    "registered_at": record.get("registered_at"),
                    "tag": record.get("tag"),
                }
            )
        pending = []
        for record in index.get("versions", {}).values():
            if record.get("stage") != PENDING_APPROVAL:
                continue
            asked = next(
                (
                    h
                    for h in reversed(index.get("history", []))
                    if h.get("action") == PENDING_APPROVAL and h.get("version") == record.get("version")
                ),
                {},
            )
            pending.append(
                {
                    "version": record.get("version"),
                    "dag_id": asked.get("dag_id") or record.get("dag_id"),
                    "run_id": asked.get("dag_run_id") or record.get("dag_run_id"),
                    # the lifecycle's train DAG asks in its task "approval" (Airflow HITL), unmapped
                    "task_id": asked.get("approval_task_id") or APPROVAL_TASK,
                    "map_index": asked.get("approval_map_index", -1),
                    "at": asked.get("at"),
                    "candidate_score": asked.get("candidate_score"),
                    "production_score": asked.get("production_score"),
                }
            )
        return {
            "name": name,
            "metric": self._metric(index),
            "production_version": index.get("production"),
            "versions": versions,
            "decisions": self._decisions(index),
            "pending_approvals": pending,
        }

    # ------------------------------------------------------------------ trials
    def trials(self, name: str, index: dict[str, Any], run_id: str | None = None) -> dict[str, Any] | None:
        """The trial table of the model's last tuning run (or of ``run_id``), read from the tuning task's
        ``tuning/result.json`` and ``trials.csv`` in the train run's artifact folder."""
        records = sorted(index.get("versions", {}).values(), key=lambda r: r.get("registered_at") or "")
        runs = [
            (r.get("dag_id"), r.get("dag_run_id")) for r in records if r.get("dag_id") and r.get("dag_run_id")
        ]
        if run_id is not None:
            runs = [run for run in runs if run[1] == run_id]
        for dag_id, run in reversed(runs):
            result = self._tuning_result(dag_id, run)
            if result is not None:
                return {
                    "dag_id": dag_id,
                    "run_id": run,
                    "metric": result.get("metric"),
                    "mode": result.get("mode"),
                    "best_trial_id": result.get("best_trial_id"),
                    "trials": self._trial_rows(result),
                    "plot_url": report_path(result.get("plot_uri"), self.root),
                }
        return None

    def _tuning_result(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        run_folder = self.store.root / safe_segment(dag_id) / safe_segment(run_id)
        try:
            tasks = sorted(run_folder.iterdir(), key=lambda p: p.name) if run_folder.exists() else []
        except (OSError, FileNotFoundError):
            return None
        for task_folder in tasks:
            candidate = task_folder / TUNING_FOLDER / "result.json"
            if candidate.exists():
                return json.loads(candidate.read_bytes())
        return None

    def _trial_rows(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        from airflow_mlops.artifacts import as_path

        uri = result.get("trials_uri")
        if not uri:
            return []
        metric = result.get("metric")
        rows = []
        text = as_path(uri).read_bytes().decode()
        for row in csv.DictReader(io.StringIO(text)):
            params = {}
            for key, value in row.items():
                if key and key.startswith("config."):
                    params[key.removeprefix("config.")] = _number(value)
            rows.append(
                {
                    "trial_id": row.get("trial_id"),
                    "params": params,
                    "score": _number(row.get(metric or "")),
                    "best_score": _number(row.get(f"best_{metric}")),
                    "status": row.get("status"),
                    "best": row.get("best") == "1",
                    "iterations": _number(row.get("iterations")),
                    "time_s": _number(row.get("time_s")),
                    "error": row.get("error") or None,
                }
            )
        return rows

    # ------------------------------------------------------------------ drift, validation
    def drift(self, name: str) -> dict[str, Any]:
        """Drift per column and quality over time, oldest first."""
        checks = drift_checks(name, self.hook.state)
        columns: dict[str, dict[str, Any]] = {}
        quality = []
        for check in checks:
            report_url = report_path(check.get("report_uri"), self.root)
            for column, figures in (check.get("columns") or {}).items():
                entry = columns.setdefault(
                    column,
                    {
                        "column": column,
                        "threshold": figures.get("threshold"),
                        "method": figures.get("method"),
                        "points": [],
                    },
                )
                entry["threshold"] = figures.get("threshold")
                entry["points"].append(
                    {
                        "at": check.get("at"),
                        "data_interval_start": check.get("data_interval_start"),
                        "score": figures.get("score"),
                        "threshold": figures.get("threshold"),
                        "drifted": bool(figures.get("drifted")),
                        "run_id": check.get("run_id"),
                        "report_url": report_url,
                    }
                )
            q = check.get("quality")
            if q and q.get("metric"):
                quality.append(
                    {
                        "at": check.get("at"),
                        "data_interval_start": check.get("data_interval_start"),
                        "metric": q["metric"],
                        "value": q.get("value"),
                        "holdout": q.get("holdout"),
                        "threshold": q.get("threshold"),
                        "run_id": check.get("run_id"),
                    }
                )
        return {
            "threshold_share": checks[-1].get("threshold_share") if checks else None,
            "checks": len(checks),
            "columns": sorted(columns.values(), key=lambda c: c["column"]),
            "quality": quality,
        }

    def validation(self, dag_ids: set[str]) -> dict[str, Any]:
        """Every recorded batch validation of the DAGs ``dag_ids``, newest first."""
        return {"batches": [self.batch(row) for row in validations(dag_ids, self.hook.state)]}

    def batch(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "batch": row.get("batch"),
            "dag_id": row.get("dag_id"),
            "run_id": row.get("run_id"),
            "task_id": row.get("task_id"),
            "at": row.get("at"),
            "data_interval_start": row.get("data_interval_start"),
            "rows": row.get("rows"),
            "passed": bool(row.get("passed")),
            "evaluated": row.get("evaluated"),
            "failed_expectations": row.get("failed_expectations") or [],
            "read_error": row.get("read_error"),
            "quarantined_uri": row.get("quarantined_uri"),
            "report_url": report_path(row.get("report_uri"), self.root),
        }

    # ------------------------------------------------------------------ tabs
    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """The model a DAG run produced (registered) or decided on, and the gate's verdict."""
        for name in self.model_names():
            index = self.hook.read_index(name)
            produced = [
                r
                for r in index.get("versions", {}).values()
                if r.get("dag_id") == dag_id and r.get("dag_run_id") == run_id
            ]
            decisions = [
                d for d in self._decisions(index) if d["run_id"] == run_id and d["dag_id"] in (dag_id, None)
            ]
            if not produced and not decisions:
                continue
            version = produced[-1].get("version") if produced else decisions[-1]["version"]
            pending = next(
                (
                    p
                    for p in self.model_detail(name, index)["pending_approvals"]
                    if p["run_id"] == run_id and p["dag_id"] == dag_id
                ),
                None,
            )
            return {
                "model": name,
                "version": version,
                "stage": (index.get("versions", {}).get(version) or {}).get("stage"),
                "decision": decisions[-1] if decisions else None,
                "pending_approval": pending,
            }
        return {"model": None, "version": None, "stage": None, "decision": None, "pending_approval": None}

    def task(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        """What a monitor or validate task instance recorded."""
        found = task_record(dag_id, run_id, task_id, map_index, self.hook.state)
        if found is None:
            return {"kind": None, "summary": None, "report_url": None}
        kind, body = found
        summary = self.batch(body) if kind == "validation" else body
        return {
            "kind": kind,
            "summary": summary,
            "report_url": report_path(body.get("report_uri"), self.root),
        }


def _number(value: Any) -> Any:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return (
        int(number)
        if number.is_integer() and "." not in str(value) and "e" not in str(value).lower()
        else number
    )


__all__ = ["DRIFT_CHECKS", "LIFECYCLE_STAGES", "ModelViews", "report_path"]
