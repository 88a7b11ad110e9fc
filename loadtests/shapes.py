"""Load shapes, as Locust LoadTestShape classes: a concurrency sweep, a spike, and a short smoke run.

Each shape is a pure function of the run time, so `step_at(t)` can say which step a request belongs to.
The parameters come from the environment (the runner sets them): FNSERVE_LT_STEPS ("1,4,16,64"),
FNSERVE_LT_HOLD (seconds per step), FNSERVE_LT_USERS and FNSERVE_LT_DURATION (smoke), FNSERVE_LT_SPIKE
("base,peak,seconds before,seconds at peak,seconds after").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from locust import LoadTestShape


@dataclass(frozen=True)
class Step:
    users: int
    seconds: float


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def schedule(scenario: str) -> list[Step]:
    """The steps of a scenario, from the environment."""
    if scenario == "sweep":
        hold = float(os.environ.get("FNSERVE_LT_HOLD", "30"))
        return [Step(users, hold) for users in _ints("FNSERVE_LT_STEPS", "1,4,16,64")]
    if scenario == "spike":
        base, peak, before, at_peak, after = _ints("FNSERVE_LT_SPIKE", "2,32,15,15,15")
        return [Step(base, before), Step(peak, at_peak), Step(base, after)]
    if scenario == "smoke":
        return [Step(int(os.environ.get("FNSERVE_LT_USERS", "2")), float(os.environ.get("FNSERVE_LT_DURATION", "20")))]
    raise ValueError(f"unknown scenario {scenario!r} (sweep, spike, smoke)")


class StepShape(LoadTestShape):
    """Hold each step's user count for its time, then stop. Users start at once (spawn rate = the step)."""

    abstract = True
    scenario = "sweep"

    def steps(self) -> list[Step]:
        return schedule(self.scenario)

    def step_at(self, run_time: float) -> int | None:
        elapsed = 0.0
        for index, step in enumerate(self.steps()):
            elapsed += step.seconds
            if run_time < elapsed:
                return index
        return None

    def tick(self) -> tuple[int, float] | None:
        index = self.step_at(self.get_run_time())
        if index is None:
            return None
        users = self.steps()[index].users
        return users, float(max(users, 1))


class SweepShape(StepShape):
    scenario = "sweep"


class SpikeShape(StepShape):
    scenario = "spike"


class SmokeShape(StepShape):
    scenario = "smoke"
