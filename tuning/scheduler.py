"""ASHA that records which trials it stopped early (imports Ray: load it only to build a Tuner).

After a Ctrl-C Ray marks the trials it cut short TERMINATED, exactly like the ones ASHA stopped,
so Tune's status cannot tell "stopped early: done" from "interrupted: --resume continues it".
This scheduler leaves `scheduler_stop.json` in each trial folder it stops before `max_t`; the
record is on the search's storage, so it survives a restored search and is read without Ray.

Tune saves no scheduler state (ray-project/ray#30838): a restored search's ASHA would start with
empty rungs and let each rung's next trials through, whatever their scores, until it filled
again. This one refills its rungs from what each restored trial reported (Tune's result log in
the trial folder) as Tune adds the trial back.
"""
from __future__ import annotations

from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from headernet_core.artifacts import write_json

from .ray_compat import asha_max_t, asha_time_attr, logged_results
from .trial import SCHEDULER_STOP


class RecordingASHA(ASHAScheduler):
    """`ASHAScheduler` (time_attr, max_t, grace_period, reduction_factor as usual) + the record."""

    def __init__(self, search_dir: str | Path, **asha_kwargs) -> None:
        super().__init__(**asha_kwargs)
        self.search_dir = str(search_dir)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # A restored or retried trial has its folder (a new one gets it when it starts); a
        # retried one's results are in the rungs already, where ASHA keeps the first.
        if trial.relative_logdir:
            for result in logged_results(Path(self.search_dir) / trial.relative_logdir):
                if all(_is_number(result.get(key)) for key in (asha_time_attr(self), self.metric)):
                    super().on_trial_result(tune_controller, trial, result)   # rungs only: no record

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(asha_time_attr(self))
        if action == TrialScheduler.STOP and epoch is not None and epoch < asha_max_t(self):
            write_json(Path(self.search_dir) / trial.relative_logdir / SCHEDULER_STOP,
                       {"epoch": int(epoch), "trial_id": trial.trial_id})
        return action


def _is_number(value) -> bool:
    """What a result must hold for ASHA to compare it (NaN included, as Tune reports it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
