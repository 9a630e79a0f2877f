"""The demo story's plan: which batches each phase ingests and monitors, daily and weekly."""

from __future__ import annotations

from airflow_mlops.demo.story import StoryPlan


def test_weekly_plan_ingests_thirteen_weeks_first_then_the_forty_after_them():
    plan = StoryPlan()  # the demo's: weekly, January-March first, the whole year
    first = plan.batch_starts(plan.first_day, plan.first_until)
    later = plan.later_starts()
    assert (len(first), first[0], first[-1]) == (13, "2013-01-01", "2013-03-26")  # 26 March .. 1 April
    assert (len(later), later[0], later[-1]) == (40, "2013-04-02", "2013-12-31")
    assert len(first) + len(later) == 53 and not set(first) & set(later)
    # the first training's holdout ends where the first months' last batch ends
    assert plan.train_conf["holdout_end"] == "2013-04-01"


def test_daily_plan_and_a_shorter_year():
    plan = StoryPlan(cadence="daily", last_day="2013-04-10")
    assert len(plan.batch_starts(plan.first_day, plan.first_until)) == 90
    assert plan.later_starts() == [f"2013-04-{d:02d}" for d in range(1, 11)]
