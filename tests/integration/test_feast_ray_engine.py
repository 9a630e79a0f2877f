"""Feast's Ray compute engine on a Ray cluster (the session's head and worker): the ``feast`` connection's
``ray_conn_id`` selects it; materializing with it writes the same online values as Feast's local engine.

Feast's own ``ray.engine`` wrote no row of the three views whose ttl is shorter than the data's age (it
filters by now - ttl), hence ``airflow_mlops.hooks.feast_ray``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from mlops_testing import run_python

pytestmark = pytest.mark.integration

START, END = "2013-01-01T00:00:00+00:00", "2013-02-01T00:00:00+00:00"
VIEWS = ["carrier_daily", "origin_daily", "plane", "weather_hourly"]

#: apply and materialize in a fresh process, as a task does; prints the rows written and where Ray ran
MATERIALIZE = """
import json, ray
from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.operators.features import parse_timestamp
hook = FeastHook(feast_conn_id="feast_it", repo_path={repo!r})
hook.apply()
rows = hook.materialize(parse_timestamp({start!r}, "start"), parse_timestamp({end!r}, "end"), {views!r})
engine = hook.repo_config.batch_engine
nodes = [n["NodeManagerAddress"] + ":" + str(n["NodeManagerPort"]) for n in ray.nodes() if n["Alive"]] if ray.is_initialized() else []
print("@@" + json.dumps({{"rows": rows, "engine": engine.type, "address": getattr(engine, "ray_address", None), "nodes": nodes,
    "gcs": ray.get_runtime_context().gcs_address if ray.is_initialized() else None}}))
"""


def _online_rows(db: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        return {
            t.split("_", 1)[1]: sorted(
                con.execute(f'select entity_key, feature_name, value, event_ts from "{t}"')
            )
            for t in tables
        }


def _materialize(feast_data, feast_dir: Path, extra: dict, env: dict | None = None) -> dict:
    code = MATERIALIZE.format(repo=str(feast_data.repo), start=START, end=END, views=VIEWS)
    conn = {"conn_type": "feast", "extra": {"repo_path": str(feast_data.repo), **extra}}
    result = run_python(
        code,
        env={
            **feast_data.env,
            "MLOPS_FEAST_DIR": str(feast_dir),
            "AIRFLOW_CONN_FEAST_IT": json.dumps(conn),
            **(env or {}),
        },
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    out = json.loads([line for line in result.stdout.splitlines() if line.startswith("@@")][-1][2:])
    out["online"] = _online_rows(feast_dir / "online_store.db")
    return out


def test_the_ray_engine_on_the_cluster_writes_what_the_local_engine_writes(feast_data, ray_cluster, tmp_path):
    ray_conn = {
        "AIRFLOW_CONN_RAY_FEAST": json.dumps(
            {
                "conn_type": "ray",
                "host": "127.0.0.1",
                "port": ray_cluster.dashboard_port,
                "extra": {"cluster_address": ray_cluster.gcs_address},
            }
        )
    }
    local = _materialize(feast_data, tmp_path / "local", {})
    on_ray = _materialize(feast_data, tmp_path / "ray", {"ray_conn_id": "ray_feast"}, ray_conn)

    assert local["engine"] == "local"
    assert on_ray["engine"] == "airflow_mlops.hooks.feast_ray.MLOpsRayComputeEngine"
    assert on_ray["address"] == ray_cluster.gcs_address
    # the task joined the session's cluster (its GCS port, its two nodes), not a Ray of its own
    assert on_ray["gcs"].rsplit(":", 1)[1] == ray_cluster.gcs_address.rsplit(":", 1)[1]
    assert len(on_ray["nodes"]) == 2
    assert on_ray["rows"] == local["rows"] and local["rows"]["weather_hourly"] == 3
    assert on_ray["online"] == local["online"]
    assert {view: len({key for key, *_ in rows}) for view, rows in on_ray["online"].items()} == on_ray["rows"]
