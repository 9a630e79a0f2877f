"""Provider registration: valid against Airflow's schema; everything it names imports."""

from __future__ import annotations

import importlib
import inspect
import json
from importlib import metadata
from pathlib import Path

import airflow
import jsonschema

from airflow_mlops.get_provider_info import get_provider_info


def test_provider_info_is_valid_against_airflows_schema():
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_entry_points_point_at_the_package():
    provider = [
        ep for ep in metadata.entry_points(group="apache_airflow_provider") if ep.dist.name == "airflow-mlops"
    ]
    assert [ep.value for ep in provider] == ["airflow_mlops.get_provider_info:get_provider_info"]
    plugins = [ep for ep in metadata.entry_points(group="airflow.plugins") if ep.dist.name == "airflow-mlops"]
    assert [ep.load().name for ep in plugins] == ["airflow_mlops"]


def _named_classes(info: dict) -> list[str]:
    names = [link for link in info.get("extra-links", [])]
    names += [c["hook-class-name"] for c in info.get("connection-types", [])]
    names += [p["plugin-class"] for p in info.get("plugins", [])]
    return names


def _named_modules(info: dict) -> list[str]:
    return [
        m
        for kind in ("operators", "sensors", "hooks", "triggers")
        for e in info.get(kind, [])
        for m in e["python-modules"]
    ]


def test_every_class_and_module_it_names_imports():
    info = get_provider_info()
    for dotted in _named_classes(info):
        module, _, name = dotted.rpartition(".")
        assert inspect.isclass(getattr(importlib.import_module(module), name)), dotted
    modules = _named_modules(info)
    assert "airflow_mlops.operators.offline_store" in modules
    for module in modules:
        importlib.import_module(module)


def test_airflow_discovers_the_provider():
    from airflow.providers_manager import ProvidersManager

    providers = ProvidersManager().providers
    assert "airflow-mlops" in providers
    assert providers["airflow-mlops"].version == metadata.version("airflow-mlops")
