"""SimpleTuner's scheduled sampling (scheduled_sampling_*: rollouts of the model's own predictions before the
noisy input) -> flow.scheduled_sampling."""

from __future__ import annotations

from typing import Any

from raytune_sd3.convert.report import Ignored
from raytune_sd3.convert.rules import Rule, Scope, as_bool, as_int, ignore, refuse_unless

# SimpleTuner's scheduled sampling (its documentation): off unless max_step_offset > 0; probability 0.0 by default
# (so nothing rolls until it is set); a ramp from prob_start 0.0 to prob_end 0.5 over ramp_steps; sampler unipc.
SIMPLETUNER_ROLLOUT = "scheduled_sampling_"
SIMPLETUNER_ROLLOUT_PROB_END = 0.5
SIMPLETUNER_ROLLOUT_SAMPLER = "unipc"


def _rollout_on(settings: dict[str, Any]) -> bool:
    return as_int(settings.get(SIMPLETUNER_ROLLOUT + "max_step_offset") or 0) > 0


def _scheduled_sampling(v: Any, s: Scope) -> dict[str, Any]:
    """scheduled_sampling_max_step_offset with its probability or ramp -> flow.scheduled_sampling."""
    offset, st = as_int(v), s.settings
    if offset <= 0:
        return {}
    ours = "flow.scheduled_sampling."
    ramp = as_int(st.get(SIMPLETUNER_ROLLOUT + "ramp_steps") or 0)
    if ramp:
        out = {ours + "ramp_steps": ramp,
               ours + "prob_start": float(st.get(SIMPLETUNER_ROLLOUT + "prob_start") or 0.0),
               ours + "prob_end": float(st.get(SIMPLETUNER_ROLLOUT + "prob_end", SIMPLETUNER_ROLLOUT_PROB_END))}
        if st.get(SIMPLETUNER_ROLLOUT + "probability") is not None:
            s.note("scheduled_sampling_probability with scheduled_sampling_ramp_steps: the ramp's prob_start and "
                   "prob_end set the chance here (flow.scheduled_sampling.prob_start/prob_end)")
    else:
        chance = float(st.get(SIMPLETUNER_ROLLOUT + "probability") or 0.0)
        if chance == 0:
            s.note("scheduled_sampling_max_step_offset without scheduled_sampling_probability (SimpleTuner's "
                   "default 0.0) rolls nothing out: flow.scheduled_sampling left off")
            return {}
        out = {ours + "probability": chance}
    if st.get(SIMPLETUNER_ROLLOUT + "sampler") is None:
        s.note(f"scheduled sampling: SimpleTuner's default rollout sampler ({SIMPLETUNER_ROLLOUT_SAMPLER}) is another "
               "solver of the same ODE; the rollouts here take Euler steps (FlowMatchEulerDiscreteScheduler's)")
    return {ours + "max_step_offset": offset, **out}


def _needs_rollout(rule: Rule) -> Rule:
    """A scheduled-sampling setting: read only with scheduled_sampling_max_step_offset > 0, as SimpleTuner does."""
    def wrapped(v: Any, s: Scope) -> dict[str, Any]:
        if not _rollout_on(s.settings):
            raise Ignored("only read with scheduled_sampling_max_step_offset > 0")
        return rule(v, s)
    return wrapped


ROLLOUT_RULES: dict[str, Rule] = {
    SIMPLETUNER_ROLLOUT + "max_step_offset": _scheduled_sampling,
    **{SIMPLETUNER_ROLLOUT + k: _needs_rollout(lambda v, s: {})  # read by _scheduled_sampling
       for k in ("probability", "ramp_steps", "prob_start", "prob_end")},
    SIMPLETUNER_ROLLOUT + "start_step": _needs_rollout(refuse_unless(
        lambda v: as_int(v) == 0, "the probability ramp starts at step 0 here")),
    SIMPLETUNER_ROLLOUT + "ramp_shape": _needs_rollout(refuse_unless(
        lambda v: str(v).lower() == "linear", "the probability ramps linearly here")),
    SIMPLETUNER_ROLLOUT + "strategy": _needs_rollout(refuse_unless(
        lambda v: str(v).lower() == "uniform", "the rollout length is uniform in 0..max_step_offset here")),
    SIMPLETUNER_ROLLOUT + "sampler": _needs_rollout(refuse_unless(
        lambda v: str(v).lower() == "euler", "the rollouts take Euler steps here (SimpleTuner's euler)")),
    SIMPLETUNER_ROLLOUT + "order": _needs_rollout(ignore("only SimpleTuner's higher-order samplers read it")),
    SIMPLETUNER_ROLLOUT + "reflexflow": _needs_rollout(refuse_unless(
        lambda v: not as_bool(v), "ReflexFlow's extra loss terms are not built here")),
    **{SIMPLETUNER_ROLLOUT + "reflexflow_" + k: _needs_rollout(ignore("only read with scheduled_sampling_reflexflow"))
       for k in ("alpha", "beta1", "beta2")},
}
