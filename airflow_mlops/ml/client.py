"""Send real flights to a served model: the reference train DAG's last step and the demo use it."""

from __future__ import annotations

from typing import Any

from airflow_mlops.artifacts import as_path


def flight_requests(data_uri: str, rows: int) -> list[dict[str, Any]]:
    """The first ``rows`` labelled flights of a data set (training set or holdout) as request bodies."""
    import pandas as pd

    with as_path(data_uri).open("rb") as handle:
        frame = pd.read_parquet(
            handle, columns=["carrier", "origin", "dest", "distance", "tailnum", "event_timestamp", "delayed"]
        )
    frame = frame.dropna(subset=["carrier", "origin", "dest", "distance", "event_timestamp"])
    step = max(1, len(frame) // max(1, rows))
    sample = frame.iloc[::step].head(rows)
    return [
        {
            "flight": {
                "carrier": r.carrier,
                "origin": r.origin,
                "dest": r.dest,
                "distance": float(r.distance),
                "scheduled_departure": r.event_timestamp.isoformat(),
                **({"tailnum": r.tailnum} if isinstance(r.tailnum, str) and r.tailnum.isalnum() else {}),
            },
            "delayed": None if pd.isna(r.delayed) else int(r.delayed),
        }
        for r in sample.itertuples()
    ]


def sample_predictions(url: str, data_uri: str, rows: int = 20, api_key: str | None = None) -> dict[str, Any]:
    """POST ``rows`` real flights to ``<url>/predict``; returns the answers with the versions that gave them."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answers = []
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        for request in flight_requests(data_uri, rows):
            response = client.post("/predict", json={"flight": request["flight"]})
            response.raise_for_status()
            answers.append({**response.json(), "delayed": request["delayed"], "flight": request["flight"]})
    versions = sorted({a.get("model_version") for a in answers})
    return {"url": url, "requests": len(answers), "versions": versions, "answers": answers}
