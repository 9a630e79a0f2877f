"""The demo's timeline: what happened to the model, month by month, as Airflow recorded it.

:func:`collect` reads what really ran from Airflow's REST API: the ingest runs and their XComs (rows
published, validation passed or quarantined), the monitor runs' drift figures, the drift Asset's events
and the train runs' decisions (gate, promotion, deployment). :func:`month_rows` turns those records into
one row per month: rows ingested, validation, the largest drift share, retraining (and why), the model
version served at the month's end and that version's holdout AUC. :func:`write_timeline` prints nothing;
it writes ``timeline.json`` (the records), ``timeline.png`` and a self-contained ``timeline.html``.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_mlops.demo.stack import AirflowClient


@dataclass(frozen=True)
class DemoDags:
    """The DAG, task and Asset names the demo drives and reads (the lifecycle's reference names)."""

    ingest: str = "flights_ingest"
    features: str = "flights_features"
    train: str = "flights_train"
    monitor: str = "flights_monitor"
    validate_task: str = "validate_batch"
    publish_task: str = "publish_to_offline_store"
    drift_task: str = "drift"
    gate_task: str = "retraining_gate"
    holdout_task: str = "holdout_set"
    promote_task: str = "promote"
    deploy_task: str = "deploy"
    predictions_task: str = "sample_predictions"
    drift_asset: str = "flight_delay_drift"


@dataclass
class Batch:
    """One ingest run: the batch's first and last day, its state, rows published."""

    start: str
    end: str
    state: str
    rows: int = 0
    quarantined: bool = False
    run_id: str = ""


@dataclass
class DriftCheck:
    """One monitor run: the last day of its window and what Evidently found."""

    window_end: str
    drift_share: float | None
    drifted: bool
    drifted_columns: list[str] = field(default_factory=list)
    run_id: str = ""


@dataclass
class Training:
    """One train run: why it ran, what the gate and the promotion decided, what got served."""

    run_id: str
    data_time: str  # the last day of data it could see (the holdout's end)
    trigger: str  # "manual" or "drift"
    state: str
    proceed: bool = True
    reason: str = ""
    cause: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    promoted: bool | None = None
    production_version: str | None = None
    candidate_score: float | None = None
    production_score: float | None = None
    served_version: str | None = None


@dataclass
class Records:
    batches: list[Batch] = field(default_factory=list)
    checks: list[DriftCheck] = field(default_factory=list)
    trainings: list[Training] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Records:
        data = json.loads(text)
        return cls(
            batches=[Batch(**b) for b in data.get("batches", [])],
            checks=[DriftCheck(**c) for c in data.get("checks", [])],
            trainings=[Training(**t) for t in data.get("trainings", [])],
        )


@dataclass
class MonthRow:
    month: str
    rows: int
    passed: int
    quarantined: int
    drift_share: float | None
    retraining: str
    version: str | None
    auc: float | None

    @property
    def validation(self) -> str:
        if not self.passed and not self.quarantined:
            return "-"
        return f"{self.passed} passed" + (f", {self.quarantined} quarantined" if self.quarantined else "")


# ---------------------------------------------------------------------------------------- collecting
#: what the timeline keeps of a drift event's ``extra``
CAUSE_KEYS = (
    "event_id",
    "data_time",
    "drift_detected",
    "drift_share",
    "drifted_columns",
    "decay_detected",
    "auc",
    "holdout_auc",
)


def _day(value: str | None) -> str:
    return str(value or "")[:10]


def collect(api: AirflowClient, dags: DemoDags = DemoDags()) -> Records:
    """Read the records of everything the demo ran from Airflow's REST API."""
    records = Records()
    for run in api.runs(dags.ingest):
        if run["state"] not in ("success", "failed"):
            continue
        start, end = _day(run["data_interval_start"]), run["data_interval_end"]
        last = (date.fromisoformat(_day(end)) - timedelta(days=1)).isoformat() if end else start
        published = api.xcom(dags.ingest, run["dag_run_id"], dags.publish_task) or {}
        states = api.task_states(dags.ingest, run["dag_run_id"])
        records.batches.append(
            Batch(
                start=start,
                end=max(start, last),
                state=run["state"],
                rows=int(published.get("rows") or 0),
                quarantined=states.get(dags.validate_task) == "failed",
                run_id=run["dag_run_id"],
            )
        )
    for run in api.runs(dags.monitor):
        found = (
            api.xcom(dags.monitor, run["dag_run_id"], dags.drift_task) if run["state"] == "success" else None
        )
        if not found:
            continue
        records.checks.append(
            DriftCheck(
                window_end=_day((found.get("window") or {}).get("end") or run["data_interval_start"]),
                drift_share=found.get("drift_share"),
                drifted=bool(found.get("drift_detected")),
                drifted_columns=sorted(found.get("drifted_columns") or {}),
                run_id=run["dag_run_id"],
            )
        )
    # the drift events each train run was started by (a run whose gate held it back has no XCom)
    caused: dict[str, dict[str, Any]] = {}
    for event in api.asset_events(dags.drift_asset):
        for created in event.get("created_dagruns") or []:
            if created.get("dag_id") == dags.train:
                caused.setdefault(created["run_id"], event.get("extra") or {})
    for run in api.runs(dags.train):
        if run["state"] not in ("success", "failed"):
            continue
        records.trainings.append(_training(api, dags, run, caused.get(run["dag_run_id"])))
    records.trainings.sort(key=lambda t: (t.data_time, t.run_id))
    return records


def skip_reason(api: AirflowClient, dags: DemoDags, run_id: str) -> str:
    """The gate's reason for holding a run back, from its log (a skipped task returns no XCom)."""
    try:
        log = api.task_log(dags.train, run_id, dags.gate_task, 1, lines=200)
    except Exception:  # the log is a nicety: the timeline does without it
        return ""
    marker = " skipped: "
    for line in reversed(log.splitlines()):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return ""


def _training(api: AirflowClient, dags: DemoDags, run: dict, event: dict[str, Any] | None) -> Training:
    run_id = run["dag_run_id"]
    gate = api.xcom(dags.train, run_id, dags.gate_task) or {}
    gate_state = api.task_states(dags.train, run_id).get(dags.gate_task)
    cause = {**(event or {}), **((gate.get("cause") or {}).get("extra") or {})}
    conf = run.get("conf") or {}
    if cause.get("data_time"):
        trigger, data_time = "drift", _day(cause["data_time"])
    else:
        trigger = "manual" if run.get("run_type") == "manual" else "drift"
        end = conf.get("holdout_end")
        data_time = (
            (date.fromisoformat(end) - timedelta(days=1)).isoformat() if end else _day(run["run_after"])
        )
    proceed = gate_state != "skipped" and gate.get("proceed", True) is not False
    reason = str(gate.get("reason") or "") if proceed else skip_reason(api, dags, run_id)
    promote = api.xcom(dags.train, run_id, dags.promote_task) or {}
    deploy = api.xcom(dags.train, run_id, dags.deploy_task) or {}
    return Training(
        run_id=run_id,
        data_time=data_time,
        trigger=trigger,
        state=run["state"],
        proceed=proceed,
        reason=reason,
        cause={k: cause[k] for k in CAUSE_KEYS if k in cause},
        version=promote.get("version"),
        promoted=promote.get("promoted"),
        production_version=promote.get("production_version"),
        candidate_score=promote.get("candidate_score"),
        production_score=promote.get("production_score"),
        served_version=deploy.get("version"),
    )


# ---------------------------------------------------------------------------------------- the rows
def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _why(training: Training) -> str:
    if training.trigger == "manual":
        what = "first training (by hand)"
    else:
        cause = training.cause
        columns = cause.get("drifted_columns") or {}
        names = ", ".join(sorted(columns)[:3]) + ("..." if len(columns) > 3 else "")
        when = cause.get("data_time", training.data_time)
        if cause.get("decay_detected") and not cause.get("drift_detected", cause.get("drift_share")):
            what = f"AUC decay {_fmt(cause.get('auc'))} (holdout {_fmt(cause.get('holdout_auc'))}) on {when}"
        else:
            what = f"drift {_fmt(cause.get('drift_share'), 2)} on {when}"
            what += f" ({names})" if names else ""
    if not training.proceed:
        return f"held back: {what}; {training.reason or 'gate'}"
    if training.state != "success" and training.promoted is None:
        return f"{what}: run failed"
    if training.promoted:
        return f"{what} -> {training.version} promoted"
    if training.promoted is False:
        return (
            f"{what} -> {training.version} rejected "
            f"({_fmt(training.candidate_score)} vs {_fmt(training.production_score)})"
        )
    return what


def _retraining(trainings: list[Training]) -> str:
    """The month's retraining column: each retraining that ran, and how many the gate held back."""
    ran = [_why(t) for t in trainings if t.proceed]
    held = [t for t in trainings if not t.proceed]
    if held:
        # the gate's reason up to its first detail, e.g. "inside the cooldown: last retraining at data time ..."
        reasons = sorted({(t.reason or "retraining gate").split(",")[0] for t in held})
        ran.append(f"{len(held)} event(s) held back by the gate ({'; '.join(reasons)})")
    if not trainings:
        return "no"
    return "; ".join(ran) if any(t.proceed for t in trainings) else "no: " + "; ".join(ran)


def month_rows(records: Records) -> list[MonthRow]:
    """One row per month from the first to the last with batches, drift checks or trainings."""
    seen = sorted(
        {b.start[:7] for b in records.batches}
        | {c.window_end[:7] for c in records.checks}
        | {t.data_time[:7] for t in records.trainings}
    )
    months = []
    if seen:  # every month from the first to the last, so the version served reads as a continuous line
        year, month = map(int, seen[0].split("-"))
        while f"{year:04d}-{month:02d}" <= seen[-1]:
            months.append(f"{year:04d}-{month:02d}")
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    auc_of: dict[str, float | None] = {}
    rows = []
    served: str | None = None
    for month in months:
        batches = [b for b in records.batches if b.start[:7] == month]
        shares = [
            c.drift_share for c in records.checks if c.window_end[:7] == month and c.drift_share is not None
        ]
        trainings = [t for t in records.trainings if t.data_time[:7] == month]
        for training in trainings:
            if training.promoted and training.version:
                auc_of[training.version] = training.candidate_score
            if training.promoted is not None and training.production_version:
                served = training.production_version
            if training.served_version:
                served = training.served_version
        retraining = _retraining(trainings)
        rows.append(
            MonthRow(
                month=month,
                rows=sum(b.rows for b in batches),
                passed=sum(1 for b in batches if b.state == "success"),
                quarantined=sum(1 for b in batches if b.quarantined),
                drift_share=max(shares) if shares else None,
                retraining=retraining,
                version=served,
                auc=auc_of.get(served) if served else None,
            )
        )
    return rows


HEADERS = ("month", "rows", "validation", "drift share", "retraining (why)", "served", "holdout AUC")


def _cells(row: MonthRow) -> tuple[str, ...]:
    return (
        row.month,
        f"{row.rows:,}",
        row.validation,
        _fmt(row.drift_share, 2),
        row.retraining,
        row.version or "-",
        _fmt(row.auc),
    )


def render_table(rows: list[MonthRow]) -> str:
    """The timeline as a plain-text table."""
    cells = [HEADERS, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    right = {1, 3, 6}

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(c) for c in cells[1:])])


# ---------------------------------------------------------------------------------------- files
def write_png(rows: list[MonthRow], path: Path) -> Path:
    """Rows ingested per month (bars), the largest drift share (line), retrainings and versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = [r.month for r in rows]
    x = list(range(len(rows)))
    fig, rows_ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    rows_ax.bar(x, [r.rows for r in rows], color="#9fc5e8", label="rows ingested")
    bad = [i for i, r in enumerate(rows) if r.quarantined]
    if bad:
        rows_ax.bar(bad, [rows[i].rows for i in bad], color="#e06666", label="month with a quarantined batch")
    rows_ax.set_ylabel("flights ingested")
    rows_ax.set_xticks(x, months, rotation=45, ha="right")
    drift_ax = rows_ax.twinx()
    points = [(i, r.drift_share) for i, r in enumerate(rows) if r.drift_share is not None]
    if points:
        drift_ax.plot(
            [i for i, _ in points],
            [v for _, v in points],
            color="#cc4125",
            marker="o",
            label="max drift share",
        )
    drift_ax.set_ylim(0, 1)
    drift_ax.set_ylabel("drift share (share of drifted columns)")
    for i, row in enumerate(rows):
        if "promoted" in row.retraining or "rejected" in row.retraining or "failed" in row.retraining:
            drift_ax.axvline(i, color="#6aa84f", linestyle="--", linewidth=1)
            label = "trained" if row.retraining.startswith("first training") else "retrained"
            label += " (rejected)" if "rejected" in row.retraining else ""
            drift_ax.annotate(
                label, (i, 0.95), rotation=90, va="top", ha="right", fontsize=8, color="#38761d"
            )
        if row.version:
            drift_ax.annotate(
                row.version[:8], (i, 0.02), ha="center", fontsize=7, color="#444444", rotation=90, va="bottom"
            )
    handles = rows_ax.get_legend_handles_labels()
    more = drift_ax.get_legend_handles_labels()
    rows_ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
    rows_ax.set_title("flight_delay: data, drift, retraining and the version served, month by month")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_html(
    rows: list[MonthRow], path: Path, png: Path | None = None, title: str = "Demo timeline"
) -> Path:
    """A self-contained page: the table and (inlined) the PNG."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows
    )
    image = ""
    if png is not None and png.exists():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        image = f'<p><img alt="timeline chart" src="data:image/png;base64,{data}" style="max-width:100%"></p>'
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f3f3f3; }} td:nth-child(2), td:nth-child(4), td:nth-child(7) {{ text-align: right; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{image}
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def write_timeline(records: Records, folder: Path) -> dict[str, Any]:
    """Write ``timeline.json``, ``timeline.png`` and ``timeline.html`` under ``folder``.

    :return: the rows, the table as text and the paths written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = month_rows(records)
    (folder / "timeline.json").write_text(records.to_json(), encoding="utf-8")
    png = write_png(rows, folder / "timeline.png")
    page = write_html(
        rows, folder / "timeline.html", png, title="airflow-mlops demo: the life of flight_delay"
    )
    return {
        "rows": rows,
        "table": render_table(rows),
        "json": folder / "timeline.json",
        "png": png,
        "html": page,
    }
