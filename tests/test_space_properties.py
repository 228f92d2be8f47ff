"""Property-based checks of `distillsweep sweep --dry-run` over the space-file schema.

Well-formed files are generated from the schema itself (SweepSpec's sections, RunConfig's dotted
paths, the objective registry and its parameters, the distribution kinds each search allows) and
must be accepted with the right trial count. Every malformed file is a well-formed one with exactly
one thing made wrong; the mutation that broke it knows which field the message must name. Each file
goes through the real CLI in-process, and Ray must never have started.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import Resources, SweepSpec, TrackingConfig
from orchestrator.metric_names import reported_metrics
from orchestrator.search import SchedulerConfig, SearchConfig
from orchestrator.spaces import DISTRIBUTIONS, MIX_KEY
from trainables.config import FOLDER_NAME, FidelityConfig, RunConfig, StudentConfig, TrainingConfig
from trainables.objectives import REGISTRY
from trainables.tasks import KNOWN_TASKS

TEACHER_LAYERS = 4
OBJECTIVES = sorted(n for n, o in REGISTRY.items() if not o.own_loss_first)  # task-specific ones
INIT_PRESETS = ["random", "lower", "upper", "skip"]
MAPPING_PRESETS = ["skip", "last", "combine"]
RANGES = ("uniform", "loguniform", "randint", "quniform")

runner = CliRunner()
Draw = Callable[[st.SearchStrategy[Any]], Any]


@dataclass(frozen=True)
class Env:
    teacher: str
    workdir: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A local 4-layer, 4-head, 32-wide teacher (a dry run reads only its config) and a scratch folder."""
    from transformers import BertConfig, BertForSequenceClassification

    teacher = tmp_path_factory.mktemp("teacher")
    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=TEACHER_LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(teacher)
    saved = os.environ.pop("DISTILLSWEEP_TRACEBACK", None)
    yield Env(str(teacher), tmp_path_factory.mktemp("spaces"))
    if saved is not None:
        os.environ["DISTILLSWEEP_TRACEBACK"] = saved


def flat(text: str) -> str:
    """Rich wraps long lines at spaces; compare with all whitespace runs made one space."""
    return " ".join(text.split())


def dry_run(env: Env, spec: dict[str, Any]) -> tuple[int, str]:
    path = env.workdir / "space.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    note(f"exit {result.exit_code}:\n{result.output}")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert not ray.is_initialized()
    return result.exit_code, result.output


# --- strategies for well-formed files -------------------------------------------------------------


def round_trips(key: str) -> bool:
    try:
        return yaml.safe_load(yaml.safe_dump({key: 1})) == {key: 1}
    except yaml.YAMLError:
        return False


WORDS = st.from_regex(r"[a-z][a-z_]{2,10}", fullmatch=True).filter(
    lambda w: w not in ("infinity", "nan", "inf") and "_" not in (w[0], w[-1])
)
# Any printable key, with Rich markup and emoji codes often (messages quote keys to Rich's console).
MARKUP = st.tuples(st.sampled_from(["[", "[/", ":", "[bold]"]), WORDS, st.sampled_from(["]", ":", ""])).map("".join)
KEYS = (st.text(st.characters(categories=("L", "N", "P", "S"), max_codepoint=0x24F), min_size=1, max_size=12)
        | MARKUP).filter(round_trips)
POSITIVE = st.floats(1e-3, 10.0, allow_nan=False, allow_infinity=False)


def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def bounds(kind: str, lo: float, hi: float) -> st.SearchStrategy[dict[str, list[Any]]]:
    """A well-formed range distribution inside [lo, hi]."""
    element = st.integers(int(lo), int(hi)) if kind == "randint" else floats(lo, hi)
    pairs = st.tuples(element, element).map(sorted).filter(lambda p: p[0] < p[1])
    if kind == "quniform":
        return st.tuples(pairs, floats(0.01, 1.0)).map(lambda t: {kind: [*t[0], t[1]]})
    return pairs.map(lambda p: {kind: list(p)})


def algorithm_of(spec: dict[str, Any]) -> str:
    return spec.get("search", {}).get("algorithm", "grid")


def categorical(draw: Draw, spec_or_algorithm: dict[str, Any] | str, values: list[Any]) -> dict[str, list[Any]]:
    """A grid (tried exhaustively) or choice (sampled), whichever the search accepts."""
    algorithm = spec_or_algorithm if isinstance(spec_or_algorithm, str) else algorithm_of(spec_or_algorithm)
    kinds = {"grid": ["grid"], "optuna": ["choice"], "random": ["grid", "choice"]}[algorithm]
    return {draw(st.sampled_from(kinds)): values}


def searched(
    draw: Draw, algorithm: str, element: st.SearchStrategy[Any], ranged: st.SearchStrategy[Any] | None = None
) -> Any:
    """A space entry: a fixed value, a grid/choice of values, or (random/optuna) a range."""
    how = ["fixed", "values"] + (["range"] if ranged is not None and algorithm != "grid" else [])
    picked = draw(st.sampled_from(how))
    if picked == "fixed":
        return draw(element)
    if picked == "range":
        return draw(ranged)
    return categorical(draw, algorithm, draw(st.lists(element, min_size=1, max_size=3)))


OBJECTIVE_PARAMS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "kd": {"temperature": floats(0.5, 8.0)},
    "att_mse": {"tensor": st.sampled_from(["scores", "probs"])},
    "minilm_v2": {"relation_heads": st.sampled_from([1, 2, 4, 8])},  # divisors of the teacher's width 32
    "crd": {
        "feat_dim": st.integers(1, 256), "nce_k": st.integers(1, 200), "temperature": floats(0.01, 1.0),
        "momentum": floats(0.0, 1.0), "label_aware_negatives": st.booleans(),
    },
}
SEARCHED_PARAMS: dict[str, dict[str, Callable[[Draw, str], Any]]] = {
    "kd": {"temperature": lambda d, a: searched(d, a, floats(0.5, 8.0), bounds("uniform", 0.5, 8.0))},
    "att_mse": {
        "tensor": lambda d, a: categorical(d, a, d(st.lists(st.sampled_from(["scores", "probs"]), min_size=1))),
    },
    "crd": {"nce_k": lambda d, a: searched(d, a, st.integers(1, 200), bounds("randint", 1, 200))},
    "minilm_v2": {
        "relation_heads": lambda d, a: categorical(d, a, d(st.lists(st.sampled_from([1, 2, 4]), min_size=1))),
    },
}


@st.composite
def objective_entries(draw: Draw) -> list[dict[str, Any]]:
    names = draw(st.lists(st.sampled_from(OBJECTIVES), unique=True, max_size=3))
    return [
        {"name": n, "weight": draw(floats(0.0, 2.0)),
         **draw(st.fixed_dictionaries({}, optional=OBJECTIVE_PARAMS.get(n, {})))}
        for n in names
    ]


@st.composite
def training_sections(draw: Draw) -> dict[str, Any]:
    return draw(st.fixed_dictionaries(
        {"learning_rate": floats(1e-6, 1e-2)},
        optional={
            "seed": st.integers(0, 10_000), "max_steps": st.integers(1, 1000) | st.just(-1),
            "warmup_ratio": floats(0.0, 1.0), "per_device_train_batch_size": st.integers(1, 64),
            "eval_steps": st.integers(1, 500), "max_seq_length": st.integers(8, 512), "bf16": st.booleans(),
            "lr_scheduler_type": st.sampled_from(["linear", "constant_with_warmup", "cosine", "polynomial"]),
        },
    ))


def layer_lists(min_size: int, max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, TEACHER_LAYERS - 1), min_size=min_size, max_size=max_size)


@st.composite
def valid_specs(draw: Draw, teacher: str, workdir: Path) -> dict[str, Any]:
    """A well-formed space file over a 4-layer teacher."""
    algorithm = draw(st.sampled_from(["grid", "random", "optuna"]))
    space: dict[str, Any] = {}

    depths = draw(st.lists(st.integers(1, TEACHER_LAYERS), min_size=1, max_size=3)) if draw(st.booleans()) else None
    if depths is not None:  # the student's depth is searched: init and mapping must suit every depth
        space["student.num_layers"] = categorical(draw, algorithm, depths)
        depth, shortest = draw(st.sampled_from(depths)), min(depths)
        init = st.sampled_from(INIT_PRESETS)
    else:
        depth = shortest = draw(st.integers(1, TEACHER_LAYERS))
        init = st.sampled_from(INIT_PRESETS) | layer_lists(depth, depth)
    mapping = st.sampled_from(MAPPING_PRESETS) | layer_lists(1, shortest)

    base: dict[str, Any] = {
        "task": "demo", "teacher": teacher, "student": {"num_layers": depth, "init": draw(init)},
        "ce_weight": draw(floats(0.05, 1.0)), "mapping": draw(mapping),
        "stages": draw(st.sampled_from(["one_stage", "auto"])), "training": draw(training_sections()),
    }
    if draw(st.booleans()):
        base["objectives"] = draw(objective_entries())

    catalog: dict[str, Callable[[], Any]] = {
        "training.learning_rate": lambda: searched(
            draw, algorithm, floats(1e-6, 1e-2), bounds("loguniform", 1e-6, 1e-2)
        ),
        "training.seed": lambda: searched(draw, algorithm, st.integers(0, 10_000), bounds("randint", 0, 10_000)),
        "training.warmup_ratio": lambda: searched(draw, algorithm, floats(0.0, 1.0), bounds("uniform", 0.0, 1.0)),
        "training.max_steps": lambda: searched(draw, algorithm, st.integers(1, 500), bounds("randint", 1, 500)),
        "ce_weight": lambda: searched(
            draw, algorithm, floats(0.05, 1.0), bounds("uniform", 0.05, 1.0) | bounds("quniform", 0.05, 1.0)
        ),
        "training.lr_scheduler_type": lambda: categorical(
            draw, algorithm, draw(st.lists(st.sampled_from(["linear", "cosine", "polynomial"]), min_size=1, max_size=3))
        ),
        "stages": lambda: categorical(
            draw, algorithm, draw(st.lists(st.sampled_from(["one_stage", "auto"]), min_size=1))
        ),
        "student.init": lambda: categorical(draw, algorithm, draw(st.lists(init, min_size=1, max_size=3))),
        "mapping": lambda: searched(draw, algorithm, mapping),
        "training.bf16": lambda: categorical(draw, algorithm, draw(st.lists(st.booleans(), min_size=1, max_size=2))),
        "output_dir": lambda: searched(draw, algorithm, KEYS.map(lambda k: f"runs/{k}")),
    }
    for key in draw(st.lists(st.sampled_from(sorted(catalog)), unique=True, max_size=3)):
        space[key] = catalog[key]()

    if draw(st.booleans()):
        mixes = draw(st.lists(st.lists(st.sampled_from(OBJECTIVES), unique=True, max_size=3), min_size=1, max_size=3))
        if draw(st.integers(0, 3)):
            space[MIX_KEY] = categorical(draw, algorithm, mixes)
        else:
            space[MIX_KEY] = mixes = mixes[0]
            mixes = [mixes]
        in_play = sorted({n for m in mixes for n in m})
    else:
        in_play = [o["name"] for o in base.get("objectives", [])]
    for name in draw(st.lists(st.sampled_from(in_play), unique=True, max_size=2)) if in_play else []:
        params = {"weight": lambda d, a: searched(d, a, floats(0.0, 2.0), bounds("uniform", 0.0, 2.0))}
        params.update(SEARCHED_PARAMS.get(name, {}))
        param = draw(st.sampled_from(sorted(params)))
        space[f"objectives.{name}.{param}"] = params[param](draw, algorithm)

    multi = algorithm == "optuna" and draw(st.booleans())
    search: dict[str, Any] = {"algorithm": algorithm, "num_samples": draw(st.integers(1, 3))}
    if multi:
        search.update(metric=["score", "eval_loss"], mode=["max", "min"])
    else:
        search.update(metric="score", mode=draw(st.sampled_from(["max", "min"])))
    if draw(st.booleans()):
        search["seed"] = draw(st.integers(0, 1000))

    spec: dict[str, Any] = {
        "name": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)),
        "base": base, "space": space, "search": search,
        "scheduler": {"type": "none"} if multi else draw(schedulers()),
        "resources": {
            "cpu": draw(st.integers(1, 8) | floats(0.1, 8.0)), "gpu": draw(st.sampled_from([0, 0.25, 0.5, 1, 2])),
        },
        "storage": str(workdir / "sweeps"),
        "tracking": {"experiment": draw(WORDS)},
    }
    optional = {
        "max_concurrent_trials": st.integers(1, 8), "max_failures": st.integers(-1, 3),
        "teachers": st.just({"demo": teacher}),
        "per_task": st.builds(lambda n: {"demo": {"training.per_device_train_batch_size": n}}, st.integers(1, 64)),
    }
    spec.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return spec


@st.composite
def schedulers(draw: Draw) -> dict[str, Any]:
    kind = draw(st.sampled_from(["none", "asha", "median", "pbt"]))
    max_t = draw(st.integers(1, 100))
    scheduler: dict[str, Any] = {"type": kind, "max_t": max_t, "grace_period": draw(st.integers(1, max_t))}
    scheduler["reduction_factor"] = draw(floats(1.5, 4.0))
    if kind == "pbt":
        scheduler["perturbation_interval"] = draw(st.integers(1, 10))
        scheduler["hyperparam_mutations"] = {"training.learning_rate": draw(bounds("loguniform", 1e-6, 1e-2))}
    return scheduler


def expected_trials(spec: dict[str, Any]) -> int:
    grids = [len(v["grid"]) for v in spec["space"].values() if isinstance(v, dict) and "grid" in v]
    return math.prod(grids) * spec["search"]["num_samples"]


@st.composite
def specs(draw: Draw) -> dict[str, Any]:
    return draw(valid_specs(TEACHER_PATH[0], TEACHER_PATH[1]))


# The module fixture's paths, for strategies (hypothesis draws them outside any fixture).
TEACHER_PATH: list[Any] = ["", Path(".")]


# --- mutations: exactly one thing made wrong, and what the message must name ---------------------

Mutation = Callable[[Draw, dict[str, Any]], list[str]]
MUTATIONS: list[Mutation] = []


def mutation(fn: Mutation) -> Mutation:
    MUTATIONS.append(fn)
    return fn


def node_at(spec: dict[str, Any], path: str) -> dict[str, Any]:
    node = spec
    for part in filter(None, path.split(".")):
        node = node.setdefault(part, {})
    return node


def set_base(spec: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a base field and drop what would override it (space entries, per-task overrides)."""
    for key in [k for k in spec["space"] if k == dotted or k.startswith(dotted + ".")]:
        del spec["space"][key]
    spec.pop("per_task", None)
    *parents, leaf = dotted.split(".")
    node_at(spec["base"], ".".join(parents))[leaf] = value


def mixes_of(spec: dict[str, Any]) -> list[list[str]]:
    """Every objective mix a trial of `spec` can get (the base objectives when the mix is not searched)."""
    value = spec["space"].get(MIX_KEY)
    if isinstance(value, dict):
        return [list(m) for m in next(iter(value.values()))]
    if value is not None:
        return [list(value)]
    return [[o["name"] for o in spec["base"].get("objectives", [])]]


def single_metric(spec: dict[str, Any]) -> None:
    spec["search"].update(metric="score", mode="max")


def fixed_depth(spec: dict[str, Any]) -> int:
    """Stop searching the student's depth; the base depth is then every trial's."""
    spec["space"].pop("student.num_layers", None)
    return spec["base"]["student"]["num_layers"]


NUMERIC_KEYS = ["training.learning_rate", "training.seed", "training.warmup_ratio", "ce_weight", "training.max_steps"]
SECTIONS: dict[str, tuple[Any, str]] = {  # where in the file -> (its model, the prefix errors name it by)
    "": (SweepSpec, ""), "base": (RunConfig, ""), "base.training": (TrainingConfig, "training."),
    "base.student": (StudentConfig, "student."), "base.fidelity": (FidelityConfig, "fidelity."),
    "search": (SearchConfig, "search."), "scheduler": (SchedulerConfig, "scheduler."),
    "resources": (Resources, "resources."), "tracking": (TrackingConfig, "tracking."),
}


@mutation
def unknown_key(draw: Draw, spec: dict[str, Any]) -> list[str]:
    where = draw(st.sampled_from(sorted(SECTIONS)))
    model, prefix = SECTIONS[where]
    key = draw(KEYS.filter(lambda k: k not in model.model_fields))
    node_at(spec, where)[key] = draw(st.integers() | WORDS)
    return [f"{prefix}{key}: Extra inputs are not permitted"]


@mutation
def unknown_space_path(draw: Draw, spec: dict[str, Any]) -> list[str]:
    section, model = draw(st.sampled_from([("", RunConfig), ("training.", TrainingConfig), ("student.", StudentConfig),
                                           ("fidelity.", FidelityConfig)]))
    key = section + draw(WORDS.filter(lambda w: w not in model.model_fields))
    spec["space"][key] = categorical(draw, spec, [1])
    return [f"{key}: Extra inputs are not permitted"]


@mutation
def malformed_space_key(draw: Draw, spec: dict[str, Any]) -> list[str]:
    odd = ["", ".", "training.", ".seed", "training..seed", "training seed", "training.learning-rate"]
    key = draw(st.sampled_from(odd) | KEYS.filter(lambda k: not all(part.isidentifier() for part in k.split("."))))
    spec["space"][key] = categorical(draw, spec, [1])
    return [f"space key {key!r}"]


WRONG_VALUES = {
    "str": st.integers() | st.lists(st.integers(), min_size=1, max_size=2),
    "int": WORDS | st.lists(st.integers(), min_size=1, max_size=2) | st.just(2.5),
    "float": WORDS.filter(lambda w: w != "auto") | st.lists(st.integers(), min_size=1, max_size=2)
    | st.dictionaries(WORDS, st.integers(), min_size=1),
    "bool": WORDS.filter(lambda w: len(w) > 5) | st.lists(st.integers(), min_size=1, max_size=2),
    "dict": WORDS | st.integers() | st.lists(st.integers(), min_size=1, max_size=2),
    "list": WORDS | st.integers() | st.just({"name": "kd"}),
}
WRONG_TYPE_TARGETS = [  # (path in the file, the field the message names, what belongs there)
    ("name", "name", "str"), ("base", "base", "dict"), ("space", "space", "dict"), ("search", "search", "dict"),
    ("search.num_samples", "search.num_samples", "int"), ("search.algorithm", "search.algorithm", "str"),
    ("search.seed", "search.seed", "int"), ("scheduler.max_t", "scheduler.max_t", "int"),
    ("scheduler.type", "scheduler.type", "str"), ("scheduler.reduction_factor", "scheduler.reduction_factor", "float"),
    ("resources.cpu", "resources.cpu", "float"), ("resources.gpu", "resources.gpu", "float"),
    ("max_concurrent_trials", "max_concurrent_trials", "int"), ("max_failures", "max_failures", "int"),
    ("storage", "storage", "str"), ("tracking.experiment", "tracking.experiment", "str"),
    ("teachers", "teachers", "dict"),
    ("base.training", "training", "dict"), ("base.training.learning_rate", "training.learning_rate", "float"),
    ("base.training.seed", "training.seed", "int"), ("base.training.max_steps", "training.max_steps", "int"),
    ("base.training.bf16", "training.bf16", "bool"), ("base.student", "student", "dict"),
    ("base.student.num_layers", "student.num_layers", "int"), ("base.ce_weight", "ce_weight", "float"),
    ("base.teacher", "teacher", "str"), ("base.objectives", "objectives", "list"),
    ("base.fidelity.teacher_dropout", "fidelity.teacher_dropout", "bool"),
]


@mutation
def wrong_type(draw: Draw, spec: dict[str, Any]) -> list[str]:
    path, named, kind = draw(st.sampled_from(WRONG_TYPE_TARGETS))
    value = draw(WRONG_VALUES[kind])
    if path.startswith("base."):
        set_base(spec, path.removeprefix("base."), value)
    else:
        *parents, leaf = path.split(".")
        node_at(spec, ".".join(parents))[leaf] = value
    return [f"{named}:"]


@mutation
def wrong_type_in_space(draw: Draw, spec: dict[str, Any]) -> list[str]:
    key = draw(st.sampled_from(["training.learning_rate", "training.seed", "training.max_steps", "ce_weight",
                                "student.num_layers", "training.bf16"]))
    word = draw(WORDS.filter(lambda w: len(w) > 5))
    spec["space"][key] = categorical(draw, spec, [word])
    return [f"{key}={word!r}", f"{key}: Input should be"]


@mutation
def unknown_objective_in_mix(draw: Draw, spec: dict[str, Any]) -> list[str]:
    bad = draw(WORDS.filter(lambda w: w not in REGISTRY))
    mixes = mixes_of(spec)
    spec["space"][MIX_KEY] = categorical(draw, spec, [*mixes, [*mixes[0], bad]])
    return ["objectives.mix=", f"unknown objective {bad!r}"]


@mutation
def unknown_objective_in_base(draw: Draw, spec: dict[str, Any]) -> list[str]:
    bad = draw(WORDS.filter(lambda w: w not in REGISTRY))
    listed = spec["base"].setdefault("objectives", [])
    listed.append({"name": bad})
    return [f"objectives.{len(listed) - 1}.name", f"unknown objective {bad!r}"]


@mutation
def negative_weight(draw: Draw, spec: dict[str, Any]) -> list[str]:
    weight = -draw(POSITIVE)
    in_play = sorted({n for m in mixes_of(spec) for n in m})
    where = draw(st.sampled_from(["ce_weight", "base objective"] + (["space"] if in_play else [])))
    if where == "ce_weight":
        set_base(spec, "ce_weight", weight)
        return ["ce_weight: Input should be greater than or equal to 0"]
    if where == "space":
        name = draw(st.sampled_from(in_play))
        spec["space"][f"objectives.{name}.weight"] = categorical(draw, spec, [weight])
        return [f"objectives.{name}.weight=", "weight: Input should be greater than or equal to 0"]
    listed = spec["base"].setdefault("objectives", [])
    listed.append({"name": draw(st.sampled_from([n for n in OBJECTIVES if n not in {o["name"] for o in listed}])),
                   "weight": weight})
    return [f"objectives.{len(listed) - 1}.weight: Input should be greater than or equal to 0"]


@mutation
def init_beyond_teacher(draw: Draw, spec: dict[str, Any]) -> list[str]:
    depth = fixed_depth(spec)
    layers = draw(layer_lists(depth, depth))
    layers[draw(st.integers(0, depth - 1))] = draw(st.integers(TEACHER_LAYERS, 48))
    if draw(st.booleans()):
        set_base(spec, "student.init", layers)
    else:
        spec["space"]["student.init"] = categorical(draw, spec, [layers])
    return [f"student.init {layers}: teacher has {TEACHER_LAYERS} layers"]


@mutation
def init_length_mismatch(draw: Draw, spec: dict[str, Any]) -> list[str]:
    depth = fixed_depth(spec)
    layers = draw(layer_lists(1, 6).filter(lambda ls: len(ls) != depth))
    if draw(st.booleans()):
        set_base(spec, "student.init", layers)
    else:
        spec["space"]["student.init"] = categorical(draw, spec, [layers])
    return [f"student.init lists {len(layers)} teacher layers", f"student.num_layers is {depth}"]


@mutation
def student_deeper_than_teacher(draw: Draw, spec: dict[str, Any]) -> list[str]:
    fixed_depth(spec)
    depth = draw(st.integers(TEACHER_LAYERS + 1, 48))
    set_base(spec, "student.init", draw(st.sampled_from(["lower", "upper", "skip"])))
    if draw(st.booleans()):
        set_base(spec, "student.num_layers", depth)
    else:
        spec["space"]["student.num_layers"] = categorical(draw, spec, [depth])
    return [f"student.num_layers {depth}: teacher has only {TEACHER_LAYERS} layers"]


@mutation
def copied_init_with_other_width(draw: Draw, spec: dict[str, Any]) -> list[str]:
    set_base(spec, "student.hidden_size", draw(st.integers(8, 128)))
    set_base(spec, "student.init", draw(st.sampled_from(["lower", "upper", "skip"])))
    return ["student.init", "hidden_size"]


@mutation
def mapping_longer_than_student(draw: Draw, spec: dict[str, Any]) -> list[str]:
    depth = fixed_depth(spec)
    layers = draw(layer_lists(depth + 1, depth + 3))
    if draw(st.booleans()):
        set_base(spec, "mapping", layers)
    else:
        spec["space"]["mapping"] = categorical(draw, spec, [layers])
    return [f"mapping lists {len(layers)} teacher layers", f"the student has {depth} layers"]


@mutation
def mapping_beyond_teacher(draw: Draw, spec: dict[str, Any]) -> list[str]:
    depth = fixed_depth(spec)
    layers = draw(layer_lists(1, depth))
    layers[draw(st.integers(0, len(layers) - 1))] = draw(st.integers(TEACHER_LAYERS, 48))
    spec["space"]["mapping"] = categorical(draw, spec, [layers])
    return [f"mapping {layers}: teacher has {TEACHER_LAYERS} layers"]


@mutation
def empty_values(draw: Draw, spec: dict[str, Any]) -> list[str]:
    key, kind = draw(st.sampled_from(NUMERIC_KEYS + [MIX_KEY])), draw(st.sampled_from(["grid", "choice"]))
    spec["space"][key] = {kind: []}
    return [f"space.{key}: {kind} is empty"]


@mutation
def inverted_bounds(draw: Draw, spec: dict[str, Any]) -> list[str]:
    key, kind = draw(st.sampled_from(NUMERIC_KEYS)), draw(st.sampled_from(RANGES))
    element = st.integers(-100, 100) if kind == "randint" else POSITIVE
    low, high = draw(st.tuples(element, element).map(sorted))
    spec["space"][key] = {kind: [high, low, 0.1] if kind == "quniform" else [high, low]}
    return [f"space.{key}: {kind} [", "the lower bound must be below the upper"]


@mutation
def non_positive_loguniform(draw: Draw, spec: dict[str, Any]) -> list[str]:
    key = draw(st.sampled_from(NUMERIC_KEYS))
    spec["space"][key] = {"loguniform": [draw(floats(-10.0, 0.0)), draw(POSITIVE)]}
    return [f"space.{key}: loguniform [", "bounds must be positive"]


@mutation
def non_positive_step(draw: Draw, spec: dict[str, Any]) -> list[str]:
    key = draw(st.sampled_from(NUMERIC_KEYS))
    spec["space"][key] = {"quniform": [0.0, 1.0, draw(floats(-1.0, 0.0))]}
    return [f"space.{key}: quniform step", "must be positive"]


@mutation
def several_kinds(draw: Draw, spec: dict[str, Any]) -> list[str]:
    key = draw(st.sampled_from(NUMERIC_KEYS))
    kinds = draw(st.lists(st.sampled_from(DISTRIBUTIONS), min_size=2, max_size=3, unique=True))
    values = {"grid": [1], "choice": [1], "uniform": [0, 1], "loguniform": [0.1, 1], "randint": [0, 3],
              "quniform": [0, 1, 0.5]}
    spec["space"][key] = {k: values[k] for k in kinds} | draw(st.dictionaries(WORDS, st.integers(), max_size=1))
    return [f"space.{key}: give exactly one of"]


@mutation
def wrong_arity(draw: Draw, spec: dict[str, Any]) -> list[str]:
    key, kind = draw(st.sampled_from(NUMERIC_KEYS)), draw(st.sampled_from(RANGES))
    size = 3 if kind == "quniform" else 2
    spec["space"][key] = {kind: draw(st.lists(st.integers(1, 9), max_size=6).filter(lambda v: len(v) != size)
                                     | st.sampled_from(["1..3", 5]))}
    return [f"space.{key}:"]


@mutation
def fractional_gpus_above_one(draw: Draw, spec: dict[str, Any]) -> list[str]:
    gpu = draw(st.integers(1, 7)) + draw(st.sampled_from([0.5, 0.25, 0.75]) | floats(0.01, 0.99))
    spec.setdefault("resources", {})["gpu"] = gpu
    return ["resources.gpu", "a fractional GPU share must be at most 1"]


@mutation
def non_positive_resources(draw: Draw, spec: dict[str, Any]) -> list[str]:
    field = draw(st.sampled_from(["cpu", "gpu"]))
    value = draw(floats(-16.0, 0.0)) if field == "cpu" else -draw(POSITIVE)
    spec.setdefault("resources", {})[field] = value
    return [f"resources.{field}: Input should be greater than"]


@mutation
def grace_period_beyond_max_t(draw: Draw, spec: dict[str, Any]) -> list[str]:
    max_t = draw(st.integers(1, 100))
    spec["scheduler"] = {"type": "asha", "max_t": max_t, "grace_period": max_t + draw(st.integers(1, 50))}
    return ["scheduler.grace_period", f"exceeds scheduler.max_t {max_t}"]


@mutation
def multi_objective_without_optuna(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec["search"].update(algorithm=draw(st.sampled_from(["grid", "random"])), metric=["score", "eval_loss"],
                          mode=["max", "min"])
    return ["search.metric", "need search.algorithm optuna"]


@mutation
def metrics_and_modes_disagree(draw: Draw, spec: dict[str, Any]) -> list[str]:
    metrics = draw(st.lists(WORDS, min_size=0, max_size=3))
    modes = draw(st.lists(st.sampled_from(["max", "min"]), max_size=3).filter(lambda m: len(m) != len(metrics)))
    spec["search"].update(algorithm="optuna", metric=metrics, mode=modes[0] if len(modes) == 1 else modes)
    return ["search.metric"]


@mutation
def metric_no_trial_reports(draw: Draw, spec: dict[str, Any]) -> list[str]:
    name = draw(WORDS.filter(lambda w: w not in reported_metrics()))
    single_metric(spec)
    spec["search"]["metric"] = name
    return [f"search.metric {name!r} is not a metric trials report"]


@mutation
def empty_metric_list(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec["search"].update(metric=[], mode=[])
    return ["search.metric"]


@mutation
def scheduler_with_multi_objective(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec["search"].update(algorithm="optuna", metric=["score", "eval_loss"], mode=["max", "min"])
    spec["scheduler"] = draw(schedulers().filter(lambda s: s["type"] != "none"))
    return [f"scheduler.type {spec['scheduler']['type']}: early stopping needs one metric"]


@mutation
def distribution_in_grid_search(draw: Draw, spec: dict[str, Any]) -> list[str]:
    single_metric(spec)
    spec["search"]["algorithm"] = "grid"
    key = draw(st.sampled_from(NUMERIC_KEYS))
    spec["space"][key] = draw(st.sampled_from([{"choice": [1, 2]}, {"uniform": [0.1, 0.2]}, {"randint": [1, 3]}]))
    return ["search.algorithm grid tries grid entries only"]


@mutation
def grid_in_optuna_search(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec["search"]["algorithm"] = "optuna"
    spec["space"][draw(st.sampled_from(NUMERIC_KEYS))] = {"grid": [1]}
    return ["search.algorithm optuna samples every entry"]


@mutation
def param_of_objective_in_no_mix(draw: Draw, spec: dict[str, Any]) -> list[str]:
    in_play = {n for m in mixes_of(spec) for n in m}
    name = draw(st.sampled_from(OBJECTIVES))
    assume(name not in in_play)
    spec["space"][f"objectives.{name}.weight"] = categorical(draw, spec, [1.0])
    return [f"space.objectives.{name}.weight: objective {name!r} is in no objective mix"]


@mutation
def unknown_objective_param(draw: Draw, spec: dict[str, Any]) -> list[str]:
    in_play = sorted({n for m in mixes_of(spec) for n in m})
    assume(in_play)
    name = draw(st.sampled_from(in_play))
    taken = {"name", "weight", *REGISTRY[name].params_model.model_fields}
    param = draw(WORDS.filter(lambda w: w not in taken))
    spec["space"][f"objectives.{name}.{param}"] = categorical(draw, spec, [1])
    return [f"objectives.{name}.{param}=", f"objective {name!r}", param]


@mutation
def duplicate_objective_in_mix(draw: Draw, spec: dict[str, Any]) -> list[str]:
    name = draw(st.sampled_from(OBJECTIVES))
    spec["space"][MIX_KEY] = categorical(draw, spec, [*mixes_of(spec), [name, name]])
    return ["objectives.mix=", f"objectives: [{name!r}] listed more than once"]


@mutation
def mix_value_not_a_list(draw: Draw, spec: dict[str, Any]) -> list[str]:
    bad = draw(st.sampled_from(OBJECTIVES) | st.integers() | st.just({"name": "kd"})
               | st.lists(st.integers(), min_size=1))
    if draw(st.booleans()):
        spec["space"][MIX_KEY] = categorical(draw, spec, [*mixes_of(spec), bad])
    else:
        spec["space"][MIX_KEY] = bad
    return ["space.objectives.mix"]


@mutation
def both_precisions(draw: Draw, spec: dict[str, Any]) -> list[str]:
    set_base(spec, "training.bf16", True)
    set_base(spec, "training.fp16", True)
    return ["training.bf16 and training.fp16 are both true"]


@mutation
def unknown_stages(draw: Draw, spec: dict[str, Any]) -> list[str]:
    value = draw(WORDS.filter(lambda w: w not in ("one_stage", "two_stage", "auto")))
    if draw(st.booleans()):
        set_base(spec, "stages", value)
    else:
        spec["space"]["stages"] = categorical(draw, spec, [value])
    return ["stages: Input should be 'one_stage', 'two_stage' or 'auto'"]


@mutation
def two_stage_without_intermediate_objective(draw: Draw, spec: dict[str, Any]) -> list[str]:
    set_base(spec, "stages", "two_stage")
    for key in [k for k in spec["space"] if k.startswith("objectives.")]:
        del spec["space"][key]
    spec["space"][MIX_KEY] = categorical(draw, spec, draw(st.lists(st.sampled_from([[], ["kd"]]), min_size=1)))
    return ["stages two_stage: objectives hold no intermediate-layer objective"]


@mutation
def bad_pbt_mutation(draw: Draw, spec: dict[str, Any]) -> list[str]:
    single_metric(spec)
    if draw(st.booleans()):
        key, dist = f"training.{draw(WORDS.filter(lambda w: w not in TrainingConfig.model_fields))}", {"grid": [1]}
    else:
        key, dist = "training.learning_rate", {"grid": [-draw(POSITIVE)]}
    spec["scheduler"] = {"type": "pbt", "hyperparam_mutations": {key: dist}}
    return [f"scheduler.hyperparam_mutations.{key}"]


@mutation
def pbt_without_mutations(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec["scheduler"] = {"type": "pbt"}
    return ["scheduler pbt needs hyperparam_mutations"]


@mutation
def unknown_task(draw: Draw, spec: dict[str, Any]) -> list[str]:
    known = {"".join(c for c in t.lower() if c.isalnum()) for t in KNOWN_TASKS}
    task = draw(WORDS.filter(lambda w: "".join(c for c in w if c.isalnum()) not in known))
    set_base(spec, "task", task)
    return [f"task {task!r} unknown"]


@mutation
def missing_teacher(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec.pop("teachers", None)
    path = f"/nonexistent/{draw(WORDS)}"
    set_base(spec, "teacher", path)
    return [f"teacher {path!r}: cannot read its config"]


@mutation
def non_finite_number(draw: Draw, spec: dict[str, Any]) -> list[str]:
    value = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
    target = draw(st.sampled_from(["training.learning_rate", "training.num_train_epochs", "ce_weight", "resources.cpu",
                                   "scheduler.reduction_factor", "space"]))
    if target == "space":
        key = draw(st.sampled_from(NUMERIC_KEYS))
        spec["search"]["algorithm"] = "random"
        spec["space"][key] = {"uniform": [0.0, value]} if value > 0 else {"uniform": [value, 1.0]}
        return [f"space.{key}:"]
    if target.startswith(("resources", "scheduler")):
        section, field = target.split(".")
        spec.setdefault(section, {})[field] = value
    else:
        set_base(spec, target, value)
    return [f"{target}:"]


@mutation
def per_task_for_no_trial(draw: Draw, spec: dict[str, Any]) -> list[str]:
    task = draw(WORDS.filter(lambda w: w != "demo"))
    spec["per_task"] = {task: {"training.seed": 1}}
    return [f"per_task.{task}: no trial of this sweep has task {task!r}"]


@mutation
def out_of_range_count(draw: Draw, spec: dict[str, Any]) -> list[str]:
    target, lowest = draw(st.sampled_from([
        ("search.num_samples", 1), ("max_concurrent_trials", 1), ("max_failures", -1), ("scheduler.max_t", 1),
        ("scheduler.grace_period", 1), ("scheduler.perturbation_interval", 1),
    ]))
    *parents, leaf = target.split(".")
    node_at(spec, ".".join(parents))[leaf] = lowest - draw(st.integers(1, 100))
    return [f"{target}: Input should be greater than or equal to {lowest}"]


@mutation
def reduction_factor_not_above_one(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec["scheduler"]["reduction_factor"] = draw(floats(-4.0, 1.0))
    return ["scheduler.reduction_factor: Input should be greater than 1"]


@mutation
def bad_name(draw: Draw, spec: dict[str, Any]) -> list[str]:
    spec["name"] = draw(KEYS.filter(lambda k: not FOLDER_NAME.fullmatch(k)) | st.sampled_from(["my sweep", ".", ".."]))
    return ["a name starts with a letter or digit"]


@st.composite
def malformed_specs(draw: Draw) -> tuple[dict[str, Any], str, list[str]]:
    spec = copy.deepcopy(draw(specs()))
    mutate = draw(st.sampled_from(MUTATIONS))
    named = mutate(draw, spec)
    return spec, mutate.__name__, named


# --- the properties --------------------------------------------------------------------------------

def fast(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


@pytest.fixture(autouse=True, scope="module")
def _paths_for_strategies(env: Env) -> None:
    TEACHER_PATH[:] = [env.teacher, env.workdir]


@fast(60)
@given(spec=specs())
def test_well_formed_space_files_are_accepted_with_their_trial_count(env: Env, spec: dict[str, Any]) -> None:
    code, out = dry_run(env, spec)
    assert code == 0, out
    assert f"sweep {spec['name']}: {expected_trials(spec)} trials" in flat(out)
    assert "trial configs checked" in flat(out)


@fast(250)
@given(case=malformed_specs())
def test_every_malformed_space_file_is_rejected_naming_the_field(env: Env, case: tuple) -> None:
    spec, mutation_name, named = case
    note(f"mutation {mutation_name}: must name {named}")
    code, out = dry_run(env, spec)
    assert code == 2, f"{mutation_name} accepted:\n{out}"
    assert flat(out).startswith("error:"), out
    for part in named:
        assert flat(part) in flat(out), f"{mutation_name}: {part!r} not named in:\n{out}"


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda m: m.__name__)
@fast(4)
@given(data=st.data())
def test_each_mutation_is_rejected_naming_the_field(env: Env, mutate: Mutation, data: st.DataObject) -> None:
    """Every mutation gets a few examples of its own, whatever the sampler above favoured."""
    spec = copy.deepcopy(data.draw(specs()))
    named = mutate(data.draw, spec)
    code, out = dry_run(env, spec)
    assert code == 2, f"{mutate.__name__} accepted:\n{out}"
    for part in named:
        assert flat(part) in flat(out), f"{mutate.__name__}: {part!r} not named in:\n{out}"
