"""A sweep's space: each entry a fixed value or one `Distribution`, and how Tune draws it.

Objective parameters are conditional: `objectives.kd.weight` is drawn only for trials whose
`objectives.mix` contains `kd`. Tune's variant generator gets that through `sample_from`; Optuna
gets a define-by-run space (`orchestrator.trials`), so its model never sees parameters that did
not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import model_serializer, model_validator

from orchestrator.messages import brief
from trainables.config import StrictModel

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
MIX_KEY = "objectives.mix"  # the space key whose value is a list of objective names


class Distribution(StrictModel):
    """One searched value. Exactly one field is set; `grid` values are all tried."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    quniform: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> Distribution:
        kind = self.kind
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} is empty: list at least one value")
        if kind in ("uniform", "loguniform", "randint", "quniform") and not value[0] < value[1]:
            raise ValueError(f"{kind} [{value[0]}, {value[1]}]: the lower bound must be below the upper")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform [{value[0]}, {value[1]}]: bounds must be positive")
        if kind == "quniform" and value[2] <= 0:
            raise ValueError(f"quniform step {value[2]} must be positive")
        return self

    @property
    def kind(self) -> str:
        set_fields = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(set_fields) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}")
        return set_fields[0]

    @model_serializer
    def _as_written(self) -> dict[str, Any]:
        """Dump as the file wrote it (`{grid: [...]}`), so a saved spec loads back unchanged."""
        return {self.kind: getattr(self, self.kind)}

    def representatives(self) -> list[Any]:
        """Values that stand for the whole distribution when checking configs before a sweep."""
        value = getattr(self, self.kind)
        if self.kind in ("grid", "choice"):
            return list(value)
        return [value[0], value[1]]


def is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def distribution_kinds(space: dict[str, Any]) -> set[str]:
    return {value.kind for value in space.values() if isinstance(value, Distribution)}


def check_mixes(value: Any) -> None:
    """Every objective mix must be a list of names: a bare `kd` would be read as the mix [k, d]."""
    for mix in value.representatives() if isinstance(value, Distribution) else [value]:
        if not isinstance(mix, list) or not all(isinstance(name, str) for name in mix):
            raise ValueError(f"space.{MIX_KEY}: each mix is a list of objective names like [kd, att_kl], got {brief(mix)}")


def objective_of(key: str) -> str | None:
    """`objectives.kd.weight` -> `kd`; other keys -> None."""
    parts = key.split(".")
    return parts[1] if parts[0] == "objectives" and len(parts) == 3 else None


def tune_domain(dist: Distribution) -> Any:
    from ray import tune

    kind, value = dist.kind, getattr(dist, dist.kind)
    if kind == "grid":
        return tune.grid_search(list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "uniform":
        return tune.uniform(*value)
    if kind == "loguniform":
        return tune.loguniform(*value)
    if kind == "randint":
        return tune.randint(value[0], value[1] + 1)
    return tune.quniform(*value)


def tune_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """Tune's param_space: distributions as Tune domains, objective parameters conditional."""
    from ray import tune

    param_space: dict[str, Any] = {}
    for key, value in space.items():
        domain = tune_domain(value) if isinstance(value, Distribution) else value
        name = objective_of(key)
        if name is not None and MIX_KEY in space and isinstance(value, Distribution) and value.kind != "grid":
            param_space[key] = tune.sample_from(conditional_sampler(name, domain))
        else:
            param_space[key] = domain
    return param_space


def conditional_sampler(name: str, domain: Any) -> Callable[[Any], Any]:
    def sample(trial_spec: Any) -> Any:
        return domain.sample() if name in trial_spec.config[MIX_KEY] else None

    return sample
