"""Seattle's real daily weather 2012-2015 (vega_datasets ``seattle-weather.csv``) as training sets for a
multiclass model: the label ``weather`` has five classes (drizzle, fog, rain, snow, sun)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: the features of the day's weather model; temp_max .. wind come from the Feast feature service
#: ``rain_model`` (view ``seattle_daily``) of tests/lifecycle/seattle, month and season from the request
STORE_FEATURES = ["temp_max", "temp_min", "wind", "precipitation"]
REQUEST_FEATURES = ["month", "season"]
FEATURES = STORE_FEATURES + REQUEST_FEATURES
LABEL = "weather"


def seattle_frame() -> Any:
    from vega_datasets import data

    frame = data.seattle_weather()
    frame["station"] = "SEA"
    frame["event_timestamp"] = frame["date"].dt.tz_localize("UTC")
    frame["month"] = frame["date"].dt.month
    frame["season"] = frame["month"].map(lambda m: ["winter", "spring", "summer", "autumn"][(m % 12) // 3])
    return frame[["station", "event_timestamp", *FEATURES, LABEL]]


def write_training_set(folder: Path, name: str, start: str, end: str) -> Path:
    """Rows of [start, end) as ``<name>.parquet`` and its manifest ``<name>.json`` (what the training-set
    operator writes); returns the manifest's path."""
    frame = seattle_frame()
    rows = frame[(frame["event_timestamp"] >= start) & (frame["event_timestamp"] < end)]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.parquet"
    rows.to_parquet(data, index=False)
    manifest = folder / f"{name}.json"
    manifest.write_text(
        json.dumps(
            {
                "data_uri": f"file://{data}",
                "label": LABEL,
                "event_timestamp_column": "event_timestamp",
                "rows": len(rows),
                "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                "time_range": {
                    "start": str(rows["event_timestamp"].min()),
                    "end": str(rows["event_timestamp"].max()),
                },
            }
        )
    )
    return manifest
