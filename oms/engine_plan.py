"""An order's steps as the engine walks them: derived data, built once per
order in memory and never stored (``oms.model.Order.plan``), rebuilt after a
load or under another definition; and a step's action under its definition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oms.model import Step
from oms.process import Action, StepDef

if TYPE_CHECKING:
    from oms.engine_base import TurnBase


def action_of(sdef: StepDef, item: dict[str, Any] | None) -> Action | None:
    """A step's action under its definition: the definition's, or for a
    per-item step the one for its item's action (None: nothing to do)."""
    if sdef.per_item is not None:
        return sdef.per_item.get(item["action"]) if item else None
    return sdef.action


class StepPlan:
    """An order's steps as ``advance`` walks them, built once per order in
    memory (its set of steps never changes; statuses are read live).

    launch: per step definition, in definition order: its steps, the steps
      it depends on, and its one step if it has only one (else None).
      orphans: steps the definition no longer has (``oms.orphans``), in
      order. last_first: all of them, last first (``advance`` asks whether all
      are settled: a later step settles later, as a rule, so the answer "no"
      comes after one step, not after all the settled ones). facts: the
      order's facts named so far (by templates, ``TurnBase.total_minor``),
      those that never change.
    """

    __slots__ = ("defs", "facts", "last_first", "launch", "orphans")
    orphans: list[Step]
    launch: list[tuple[StepDef, list[Step], list[Step], Step | None]]

    def __init__(self, turn: TurnBase) -> None:
        self.facts: dict[str, Any] = {}  # the order's facts that never change (oms.templates)
        self.defs = turn.defs  # the definition this plan was made under
        steps = turn.order.steps.values()
        self.last_first = list(reversed(steps))
        groups: dict[str, list[Step]] = {}
        self.orphans = orphans = []
        known = turn.known  # ``turn.defined``'s answers so far, by shape
        for step in steps:
            name = step.name
            group = groups.get(name)
            if group is None:
                groups[name] = [step]
            else:
                group.append(step)
            if not (known.get((name, step.op, step.item_id is None)) or turn.defined(step)):
                orphans.append(step)
        self.launch = launch = []
        for sdef in turn.proc.steps:
            group = groups.get(sdef.name)
            if group is not None:
                after = sdef.after
                if len(after) == 1:  # most definitions: its one dependency's steps, as they are
                    deps = groups.get(after[0]) or []  # (lists only read once built)
                else:
                    deps = []
                    for name in after:
                        deps += groups.get(name, ())
                launch.append((sdef, group, deps, group[0] if len(group) == 1 else None))
