"""Checkpoint selection on validation wordings only.

The rule (issue Q): a method's reported checkpoint is the evaluation point with the highest
validation NEW accuracy among those whose validation OLD drop (base OLD minus OLD at that point)
is at most ``max_old_drop`` (default 5 points). Step 0 (the untrained student) is an evaluation
point like any other, so a method that never beats its start is reported at step 0; ties go to
the earliest step (the cheaper checkpoint). When no point qualifies the method is reported as
not qualifying, never at its best NEW regardless of OLD.

Near/far (the held-out test wordings) are never read here: the selected step is decided before
they are measured, and they are measured only on the selected model and the end-of-budget one.

``BestCheckpoint`` applies the rule online during training, keeping a host copy of the best
qualifying model's parameters, so the selected model can be evaluated after the run without
writing every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

NEW_KEY, OLD_KEY = "val_new", "val_old"
EPS = 1e-9  # accuracy differences are multiples of 1/n; this only absorbs float rounding


def old_drop(base_old: float, old: float) -> float:
    """Points lost on OLD (validation): positive is forgetting."""
    return float(base_old) - float(old)


def qualifies(record: Mapping, base_old: float, max_old_drop: float = 0.05) -> bool:
    """Whether an evaluation record's validation OLD drop is within ``max_old_drop``."""
    return old_drop(base_old, record[OLD_KEY]) <= max_old_drop + EPS


def select(curve: Sequence[Mapping], base_old: float, max_old_drop: float = 0.05
           ) -> dict | None:
    """The selected record of ``curve`` (records with "step", "val_new", "val_old"), or None.

    Raises:
      ValueError: an empty curve, a record without the validation keys, max_old_drop < 0.
    """
    if max_old_drop < 0:
        raise ValueError(f"max_old_drop must be >= 0, got {max_old_drop}")
    if not curve:
        raise ValueError("select needs at least one evaluation record, got an empty curve")
    best = None
    for r in curve:
        missing = [k for k in ("step", NEW_KEY, OLD_KEY) if k not in r]
        if missing:
            raise ValueError(f"evaluation record {dict(r)} lacks {missing}")
        if not qualifies(r, base_old, max_old_drop):
            continue
        if best is None or r[NEW_KEY] > best[NEW_KEY] + EPS or (
                abs(r[NEW_KEY] - best[NEW_KEY]) <= EPS and r["step"] < best["step"]):
            best = r
    return None if best is None else dict(best)


@dataclasses.dataclass
class BestCheckpoint:
    """The selection rule applied online: ``update(step, record, params)`` after each
    evaluation keeps a host copy of the parameters of the best qualifying point so far.

    ``params`` is any pytree of arrays (for example ``nnx.state(model, nnx.Param)``); it is
    copied to host numpy (a copy, never a view of a device buffer a later step may donate)
    only when it becomes the best, so the cost is one transfer per improvement.
    """

    base_old: float
    max_old_drop: float = 0.05
    record: dict | None = None
    params: object = None

    def update(self, step: int, record: Mapping, params) -> bool:
        """Considers one evaluation point; returns True when it became the selected one."""
        import jax

        r = {"step": int(step), **record}
        cand = select([r] if self.record is None else [self.record, r], self.base_old,
                      self.max_old_drop) if qualifies(r, self.base_old, self.max_old_drop) \
            else None
        if cand is None or cand["step"] != r["step"]:
            return False
        self.record = cand
        from sleep_jax.runtime import host_read

        # a real copy: on CPU device_get returns a view that pins the device buffer, which the
        # next (donating) train step would otherwise reuse. host_read: also when the arrays
        # span processes (a collective then: every process updates alike)
        self.params = jax.tree.map(lambda x: np.array(x, copy=True), host_read(params))
        return True

    @property
    def qualifies(self) -> bool:
        return self.record is not None
