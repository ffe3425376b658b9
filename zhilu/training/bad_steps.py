"""What a run does with a bad step: a NaN or inf loss or gradient norm on any rank.

Every rank learns of it before any optimizer step (the trainer reduces one flag over the
world), so all take the same decision (``train.on_bad_step``):

* ``skip``: the update is dropped and the step count does not advance, so the run equals one
  whose data never had that batch; after ``bad_steps_in_a_row`` in a row the run aborts.
* ``rollback``: as skip, and after ``bad_steps_in_a_row`` in a row the run returns to its
  last checkpoint and passes over every batch since it (the ones that led to the bad steps,
  as PaLM did after loss spikes); a second rollback to the same checkpoint aborts.
* ``abort``: the run stops at the first bad step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BadSteps:
    policy: str
    in_a_row_limit: int
    seen: list[dict[str, Any]] = field(default_factory=list)  # every bad step, for summary.json
    in_a_row: int = 0
    rolled_back_to: set[int] = field(default_factory=set)

    def record(self, step: int, batch: int, ranks: list[int], loss: float, grad_norm: float) -> str:
        """Note bad step ``step`` (on batch ``batch``, seen on ``ranks``); returns what to do:
        skip, rollback or abort."""
        self.seen.append({"step": step, "batch": batch, "ranks": ranks, "loss": _number(loss),
                          "grad_norm": _number(grad_norm)})
        self.in_a_row += 1
        if self.policy == "abort":
            return "abort"
        if self.in_a_row < self.in_a_row_limit:
            return "skip"
        return "rollback" if self.policy == "rollback" else "abort"

    def good(self) -> None:
        self.in_a_row = 0

    def may_roll_back_to(self, step: int) -> bool:
        if step in self.rolled_back_to:
            return False
        self.rolled_back_to.add(step)
        self.in_a_row = 0
        return True

    def why_abort(self) -> str:
        last = self.seen[-1]
        what = "loss" if last["loss"] is None else "gradient norm"
        if self.policy == "abort":
            return f"step {last['step']}: the {what} is not finite (train.on_bad_step=abort)"
        return (f"step {last['step']}: {self.in_a_row} bad steps in a row (the {what} is not finite; "
                f"train.on_bad_step={self.policy}, train.bad_steps_in_a_row={self.in_a_row_limit})")

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "rolled_back_to": sorted(self.rolled_back_to)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = list(state.get("seen", []))
        self.rolled_back_to = set(state.get("rolled_back_to", []))


def _number(x: float) -> float | None:
    """JSON has no NaN or infinity: those are null."""
    return x if x == x and abs(x) != float("inf") else None
