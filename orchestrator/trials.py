"""A trial's values: how Optuna suggests them, and how they become one resolved RunConfig.

A sweep fixes a base config, per-task overrides and the teachers; each trial draws values for
the space's dotted keys. Two keys are sweep vocabulary, never seen by a run: `objectives.mix`
lists objective names, and `objectives.<name>.<param>` sets a parameter of an objective in the
mix. Optuna's categorical choices must be scalars, so list-valued choices (mixes, layer lists)
are suggested by a label; labels are made and read back here, in one place.

The driver resolves each trial once (`TrialTemplate.with_run_config`); the worker and the MLflow
callback read the result from the trial's config under `RUN_CONFIG`.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from orchestrator.messages import describe_error
from orchestrator.spaces import MIX_KEY, Distribution, objective_of
from trainables.config import CONFIG_OF_RUN, RUN_CONFIG, PretrainConfig, RunConfig, set_dotted, task_name_of


MAX_LABEL_CHARS = 200


def label(value: Any) -> Any:
    """The scalar Optuna suggests for a categorical value: `[kd, att_kl]` -> `kd+att_kl`.

    A list or mapping spelled longer than MAX_LABEL_CHARS keeps its start and a digest of the whole,
    so labels stay short and two values never share one.
    """
    if not isinstance(value, (list, tuple, dict)):
        return value
    spelled = spelling(value)
    if len(spelled) <= MAX_LABEL_CHARS:
        return spelled
    digest = hashlib.sha256(spelled.encode()).hexdigest()[:12]
    return f"{spelled[:MAX_LABEL_CHARS - 16]}...~{digest}"


def spelling(value: Any) -> str:
    """A categorical value written out in full: `[kd, att_kl]` -> `kd+att_kl`."""
    if isinstance(value, (list, tuple)):
        return "+".join(spelling(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={spelling(v)}" for k, v in value.items())
    return str(value)


def labelled_choices(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """space key -> {label: value} of every categorical entry, for reading Optuna's suggestions back."""
    return {
        key: {label(v): v for v in getattr(dist, dist.kind)}
        for key, dist in space.items()
        if isinstance(dist, Distribution) and dist.kind in ("grid", "choice")
    }


def suggest(trial: Any, key: str, dist: Distribution) -> Any:
    kind, value = dist.kind, getattr(dist, dist.kind)
    if kind in ("grid", "choice"):
        labels = [label(v) for v in value]
        picked = trial.suggest_categorical(key, labels)
        return value[labels.index(picked)]
    if kind == "uniform":
        return trial.suggest_float(key, value[0], value[1])
    if kind == "loguniform":
        return trial.suggest_float(key, value[0], value[1], log=True)
    if kind == "randint":
        return trial.suggest_int(key, value[0], value[1])
    return trial.suggest_float(key, value[0], value[1], step=value[2])


class OptunaSpace:
    """A define-by-run space: the mix first, then only the parameters of objectives in it.

    A class rather than a closure because Tune pickles the searcher with the experiment.
    """

    def __init__(self, space: dict[str, Any]) -> None:
        self.entries = sorted(space.items(), key=lambda item: item[0] != MIX_KEY)

    def __call__(self, trial: Any) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        mix: list[str] | None = None
        for key, value in self.entries:
            name = objective_of(key)
            if name is not None and mix is not None and name not in mix:
                continue
            if isinstance(value, Distribution):
                drawn = suggest(trial, key, value)
            else:
                constants[key] = drawn = value
            if key == MIX_KEY:
                mix = list(drawn)
        return constants


def resolve_run_config(
    base: dict[str, Any],
    assignments: dict[str, Any],
    per_task: dict[str, dict[str, Any]] | None = None,
    config_class: type[RunConfig] | type[PretrainConfig] = RunConfig,
) -> RunConfig | PretrainConfig:
    """Build a trial's RunConfig from the sweep's base config and the values its trial drew.

    `assignments` maps dotted RunConfig paths to values, with the two mix keys above; an
    `objectives.<name>.<param>` whose `<name>` is not in the mix was not sampled and is ignored.
    `per_task` holds dotted overrides applied last for the trial's task (the study's per-task
    learning rates and batch sizes).
    """
    raw = copy.deepcopy(base)
    objective_params: dict[str, dict[str, Any]] = {}
    mix = assignments.get(MIX_KEY)
    for key, value in assignments.items():
        if key == MIX_KEY:
            continue
        name = objective_of(key)
        if name is not None:
            objective_params.setdefault(name, {})[key.split(".")[2]] = value
        else:
            set_dotted(raw, key, value)
    if mix is not None:
        defaults = {o["name"]: o for o in raw.get("objectives", []) if isinstance(o, dict) and "name" in o}
        raw["objectives"] = [{**defaults.get(name, {"name": name}), **objective_params.get(name, {})} for name in mix]
    elif objective_params:
        for entry in raw.get("objectives", []):
            entry.update(objective_params.get(entry.get("name"), {}))
    for key, value in (per_task or {}).get(raw_task_name(raw), {}).items():
        set_dotted(raw, key, value)
    return config_class.model_validate(raw)


def raw_task_name(raw: dict[str, Any]) -> str:
    """The task name of a config not validated yet; "" where the task is malformed, which the
    config's own validation then reports with the field named."""
    try:
        return task_name_of(raw.get("task", RunConfig.model_fields["task"].default))
    except ValueError:
        return ""


@dataclass(frozen=True)
class TrialTemplate:
    """Everything a sweep fixes for its trials; `resolve` turns one trial's draw into a RunConfig.

    teachers: task name -> teacher directory (fine-tuned per task before the sweep).
    choices: space key -> {label: value}, for categorical values Optuna suggested by label.
    """

    base: dict[str, Any]
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    teachers: dict[str, str] = field(default_factory=dict)
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: Literal["distill", "pretrain"] = "distill"

    def decode(self, trial_config: dict[str, Any]) -> dict[str, Any]:
        """The values a trial drew: labels mapped back, parameters that were not sampled (None) dropped."""
        decoded = {}
        for key, value in trial_config.items():
            if key == RUN_CONFIG:
                continue
            if key in self.choices and isinstance(value, str):
                value = self.choices[key].get(value, value)
            if value is not None:
                decoded[key] = value
        return decoded

    def resolve(self, trial_config: dict[str, Any]) -> RunConfig | PretrainConfig:
        cfg = resolve_run_config(self.base, self.decode(trial_config), self.per_task, CONFIG_OF_RUN[self.kind])
        if cfg.task_name in self.teachers:
            cfg = cfg.model_copy(update={"teacher": self.teachers[cfg.task_name]})
        return cfg

    def with_run_config(self, trial_config: dict[str, Any]) -> dict[str, Any]:
        """The trial's config with its resolved RunConfig (as JSON) under `RUN_CONFIG`; for a draw
        that is no valid config, the reason instead, which the trial then fails with."""
        try:
            resolved: dict[str, Any] | str = self.resolve(trial_config).model_dump(mode="json")
        except (ValidationError, ValueError) as err:
            resolved = describe_error(err)
        return {**trial_config, RUN_CONFIG: resolved}

    def run_config_of(self, trial_config: dict[str, Any]) -> RunConfig | PretrainConfig:
        """The RunConfig the driver resolved for this trial (resolved here for sweeps started before
        the driver did); ValueError for a draw that is no valid config."""
        resolved = trial_config.get(RUN_CONFIG)
        if resolved is None:
            return self.resolve(trial_config)
        if isinstance(resolved, str):
            raise ValueError(resolved)
        return CONFIG_OF_RUN[self.kind].model_validate(resolved)
