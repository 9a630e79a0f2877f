"""The local Ray's environment for Tune's trial actors (no Ray started)."""

from __future__ import annotations

import os

from airflow_mlops.hooks.ray import trial_env_inherited


def test_trials_of_a_local_ray_get_tunes_variables_from_its_environment_not_a_runtime_env(monkeypatch):
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, _ActorClassCache

    monkeypatch.delenv("PL_DISABLE_FORK", raising=False)
    tune_defaults = dict(DEFAULT_ENV_VARS)
    assert tune_defaults, "this Ray Tune gives its trial actors no default variables any more"

    class Inside:
        pass

    class After:
        pass

    with trial_env_inherited() as inherited:
        inside = _ActorClassCache().get(Inside)  # what Tune does for each trainable
        # what Ray's processes inherit when the local Ray starts now: Tune's variables, all of them
        assert inherited == tune_defaults
        assert {k: os.environ.get(k) for k in tune_defaults} == tune_defaults
    # the trial actors ask for no runtime env: Ray can start them on its prestarted workers, directly
    assert not inside._default_options.get("runtime_env")

    after = _ActorClassCache().get(After)
    assert after._default_options["runtime_env"] == {"env_vars": tune_defaults}  # Tune's own, restored
    assert "PL_DISABLE_FORK" not in os.environ
