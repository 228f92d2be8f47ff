"""The study's findings checked on a sweep's own numbers, so that a researcher reads in the report,
not in a notebook, whether this sweep agrees with the paper.

"How to Distill your BERT" (Wang et al., ACL 2023; shared/paper_spec.md section 9) found that
attention transfer gives the best task average (claim 1), that the teacher layers a student starts
from matter (claim 2), that for vanilla KD and hidden-state transfer the lower layers beat higher
ones (claim 3), most on QNLI, by up to 17.8 points (claim 4), and that attention transfer is robust
to that choice (claim 5).

Every comparison carries the seeds and trials behind it. The seed spread is a cell's standard
deviation over seeds, pooled over the cells compared; a difference within it, or a cell with one
seed, reads "not enough seeds to tell" rather than agreeing or disagreeing. Pure functions over
one `Observation` per trial, which the report builds with the same counting rule as its tables.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from statistics import mean, variance
from typing import Any, Literal

AGREES = "agrees"
DISAGREES = "disagrees"
TOO_FEW_SEEDS = "not enough seeds to tell"
NO_CLAIM = "no claim in the paper"
PAPER_QNLI_GAP = 0.178  # claim 4, in the units trials report (accuracy 0-1)
ATTENTION_TERMS = frozenset({"att_kl", "att_mse"})
NOT_TEACHER_LAYERS = ("random", "pretrained")  # initialisations that copy no teacher layer

PAPER = {
    1: "attention transfer (att_kl, att_mse) gives the best task average, above hidden-state transfer and vanilla KD",
    2: "in the task-specific setting, the teacher layers a student is initialised from matter",
    3: "for vanilla KD and hidden-state transfer, initialising from the lower teacher layers beats higher layers",
    4: "the lower-layer advantage of claim 3 is largest on QNLI, up to 17.8 accuracy points",
    5: "attention transfer is robust to the initialisation: scores differ within seed noise",
}

Family = Literal["kd", "hidden", "attention", "other"]


@dataclass(frozen=True)
class Observation:
    """One trial as the claims see it; score None where the report does not count the trial."""

    task: str
    configuration: str  # the report's row label: the objective mix plus any other varied key
    mix: str
    init: str
    seed: int
    score: float | None


@dataclass(frozen=True)
class Evidence:
    """What a comparison rests on: the fewest seeds in any cell compared, the trials counted in
    them, and their pooled standard deviation over seeds (None where no cell has two)."""

    seeds: int
    trials: int
    seed_spread: float | None


@dataclass(frozen=True)
class InitGap:
    """Lower minus a higher teacher-layer initialisation, for one task and configuration."""

    task: str
    configuration: str
    lower: str
    higher: str
    lower_mean: float | None
    higher_mean: float | None
    difference: float | None
    evidence: Evidence
    claim: int | None
    verdict: str


@dataclass(frozen=True)
class InitSpread:
    """Best minus worst teacher-layer initialisation, for one task and configuration."""

    task: str
    configuration: str
    means: dict[str, float]
    missing: tuple[str, ...]  # initialisations the sweep ran with no counted trial
    spread: float | None
    evidence: Evidence
    claim: int
    verdict: str


@dataclass(frozen=True)
class QnliGap:
    """Claim 4 for one configuration and pair of initialisations: QNLI's gap against the largest
    gap of any other task."""

    configuration: str
    lower: str
    higher: str
    qnli_gap: float
    runner_up: str
    runner_up_gap: float
    evidence: Evidence
    verdict: str


@dataclass(frozen=True)
class Ranked:
    configuration: str
    family: Family
    average: float
    tasks: int
    evidence: Evidence


@dataclass(frozen=True)
class Ranking:
    """Configurations at one initialisation ranked by task average (claim 1)."""

    init: str
    ranked: tuple[Ranked, ...]
    unranked: dict[str, str]  # configuration -> why it has no average
    attention: str | None  # the best attention configuration, compared with ...
    other: str | None  # ... the best of vanilla KD and hidden-state transfer
    difference: float | None
    evidence: Evidence | None
    verdict: str


@dataclass(frozen=True)
class Claims:
    gaps: tuple[InitGap, ...] = ()
    qnli: tuple[QnliGap, ...] = ()
    spreads: tuple[InitSpread, ...] = ()
    rankings: tuple[Ranking, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.gaps or self.spreads or self.rankings)


# --- what an objective mix and an initialisation are to the paper ---------------------------------


def family(mix: str) -> Family:
    """The paper's grouping of a mix: KD alone, hidden-state or attention transfer (with or without
    KD on the logits), or a mix the claims say nothing about (CRD, MiniLM, combinations)."""
    terms = set(mix.split("+"))
    if terms == {"kd"}:
        return "kd"
    layer_terms = terms - {"kd"}
    if layer_terms <= ATTENTION_TERMS:
        return "attention"
    if all(term.startswith("hidden_") for term in layer_terms):
        return "hidden"
    return "other"


def is_lower(init: str) -> bool:
    """`lower`, or a layer list that is the teacher's first layers in order (`layers_0_1_2`)."""
    if init == "lower":
        return True
    layers = init.removeprefix("layers_").split("_")
    return init.startswith("layers_") and layers == [str(i) for i in range(len(layers))]


def copies_teacher_layers(init: str) -> bool:
    return init not in NOT_TEACHER_LAYERS


# --- cells and the seeds behind them ------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """The counted scores of one (task, configuration, init) and the seeds they came from."""

    scores: tuple[float, ...]
    seeds: frozenset[int]

    @property
    def mean(self) -> float | None:
        return mean(self.scores) if self.scores else None

    @property
    def variance(self) -> float | None:
        return variance(self.scores) if len(self.scores) > 1 else None


CellKey = tuple[str, str, str]  # (task, configuration, init)


def cells_of(observations: list[Observation]) -> dict[CellKey, Cell]:
    """Every cell the sweep ran, also those with no counted trial."""
    scores: dict[CellKey, list[tuple[int, float]]] = defaultdict(list)
    for o in observations:
        key = (o.task, o.configuration, o.init)
        scores[key] += [(o.seed, o.score)] if o.score is not None else []
    return {key: Cell(tuple(s for _, s in rows), frozenset(seed for seed, _ in rows)) for key, rows in scores.items()}


def evidence(cells: list[Cell]) -> Evidence:
    variances = [c.variance for c in cells if c.variance is not None]
    return Evidence(
        seeds=min((len(c.seeds) for c in cells), default=0),
        trials=sum(len(c.scores) for c in cells),
        seed_spread=math.sqrt(mean(variances)) if variances else None,
    )


def can_tell(size: float, ev: Evidence) -> bool:
    """Whether a difference of `size` stands out of the seed noise: two seeds or more in every
    cell compared and more than the pooled seed spread."""
    return ev.seeds >= 2 and ev.seed_spread is not None and abs(size) > ev.seed_spread


def direction_verdict(difference: float, ev: Evidence) -> str:
    """For a claim that `difference` is positive."""
    if not can_tell(difference, ev):
        return TOO_FEW_SEEDS
    return AGREES if difference > 0 else DISAGREES


def robustness_verdict(spread: float, ev: Evidence) -> str:
    """For a claim that `spread` is within seed noise (claim 5): with two seeds or more, a spread
    within the seed spread is what the paper found."""
    if ev.seeds < 2 or ev.seed_spread is None:
        return TOO_FEW_SEEDS
    return DISAGREES if can_tell(spread, ev) else AGREES


def missing_verdict(inits: list[str]) -> str:
    return "no counted trial at init " + ", ".join(inits)


# --- the checks -----------------------------------------------------------------------------------


def check_claims(observations: list[Observation]) -> Claims:
    """The claims a sweep can speak to: initialisation claims where it varies the initialisation,
    the ranking where it varies the objective."""
    cells = cells_of(observations)
    mixes = {o.configuration: o.mix for o in observations}
    gaps = init_gaps(cells, mixes)
    return Claims(gaps=gaps, qnli=qnli_gaps(gaps, cells), spreads=init_spreads(cells, mixes),
                  rankings=rankings(cells, mixes))


def layer_inits(cells: dict[CellKey, Cell]) -> dict[tuple[str, str], list[str]]:
    """(task, configuration) -> the teacher-layer initialisations the sweep ran for it."""
    inits: dict[tuple[str, str], list[str]] = defaultdict(list)
    for task, configuration, init in sorted(cells):
        if copies_teacher_layers(init):
            inits[(task, configuration)].append(init)
    return inits


def init_gaps(cells: dict[CellKey, Cell], mixes: dict[str, str]) -> tuple[InitGap, ...]:
    """Claims 3 (KD, hidden-state transfer) and 5 (attention): lower minus each higher init."""
    gaps = []
    for (task, configuration), inits in layer_inits(cells).items():
        for lower in filter(is_lower, inits):
            for higher in (i for i in inits if not is_lower(i)):
                gaps.append(init_gap(task, configuration, lower, higher, cells, family(mixes[configuration])))
    return tuple(gaps)


def init_gap(task: str, configuration: str, lower: str, higher: str, cells: dict[CellKey, Cell],
             kind: Family) -> InitGap:
    low, high = cells[(task, configuration, lower)], cells[(task, configuration, higher)]
    ev = evidence([low, high])
    claim = 3 if kind in ("kd", "hidden") else 5 if kind == "attention" else None
    missing = [init for init, cell in ((lower, low), (higher, high)) if cell.mean is None]
    difference = None if missing else low.mean - high.mean
    if difference is None:
        verdict = missing_verdict(missing)
    elif claim == 3:
        verdict = direction_verdict(difference, ev)
    elif claim == 5:
        verdict = robustness_verdict(abs(difference), ev)
    else:
        verdict = NO_CLAIM
    return InitGap(task, configuration, lower, higher, low.mean, high.mean, difference, ev, claim, verdict)


def qnli_gaps(gaps: tuple[InitGap, ...], cells: dict[CellKey, Cell]) -> tuple[QnliGap, ...]:
    """Claim 4, per configuration and pair of inits that has a claim-3 gap on QNLI and elsewhere."""
    by_pair: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for gap in gaps:
        if gap.claim == 3 and gap.difference is not None:
            by_pair[(gap.configuration, gap.lower, gap.higher)][gap.task] = gap.difference
    checks = []
    for (configuration, lower, higher), by_task in sorted(by_pair.items()):
        others = {task: g for task, g in by_task.items() if task != "qnli"}
        if "qnli" not in by_task or not others:
            continue
        runner_up = max(others, key=others.__getitem__)
        ev = evidence([cells[(task, configuration, init)] for task in ("qnli", runner_up) for init in (lower, higher)])
        margin = by_task["qnli"] - others[runner_up]
        checks.append(QnliGap(configuration, lower, higher, by_task["qnli"], runner_up, others[runner_up], ev,
                              direction_verdict(margin, ev)))
    return tuple(checks)


def init_spreads(cells: dict[CellKey, Cell], mixes: dict[str, str]) -> tuple[InitSpread, ...]:
    """Claims 2 and 5: best minus worst teacher-layer init, against the seed spread."""
    spreads = []
    for (task, configuration), inits in layer_inits(cells).items():
        if len(inits) < 2:
            continue
        means = {i: m for i in inits if (m := cells[(task, configuration, i)].mean) is not None}
        missing = tuple(i for i in inits if i not in means)
        ev = evidence([cells[(task, configuration, i)] for i in means])
        claim = 5 if family(mixes[configuration]) == "attention" else 2
        spread = max(means.values()) - min(means.values()) if len(means) > 1 else None
        if spread is None:
            verdict = missing_verdict(list(missing))
        else:
            verdict = robustness_verdict(spread, ev) if claim == 5 else direction_verdict(spread, ev)
        spreads.append(InitSpread(task, configuration, means, missing, spread, ev, claim, verdict))
    return tuple(spreads)


def rankings(cells: dict[CellKey, Cell], mixes: dict[str, str]) -> tuple[Ranking, ...]:
    """Claim 1, per initialisation where the sweep ran more than one objective mix."""
    result = []
    for init in sorted({i for _, _, i in cells}):
        configurations = sorted({c for _, c, i in cells if i == init})
        if len({mixes[c] for c in configurations}) > 1:
            result.append(ranking(init, configurations, cells, mixes))
    return tuple(result)


def ranking(init: str, configurations: list[str], cells: dict[CellKey, Cell], mixes: dict[str, str]) -> Ranking:
    """Task averages over every task of the sweep at this init; a configuration without a counted
    trial on one of them is listed apart, since its average would be over other tasks."""
    tasks = sorted({t for t, _, i in cells if i == init})
    ranked, unranked = [], {}
    for configuration in configurations:
        own = [cells.get((task, configuration, init)) for task in tasks]
        lacking = [task for task, cell in zip(tasks, own) if cell is None or cell.mean is None]
        if lacking:
            unranked[configuration] = "no counted trial on " + ", ".join(lacking)
            continue
        ranked.append(Ranked(configuration, family(mixes[configuration]), mean(c.mean for c in own), len(tasks),
                             evidence(own)))
    ranked.sort(key=lambda r: -r.average)
    attention = next((r for r in ranked if r.family == "attention"), None)
    other = next((r for r in ranked if r.family in ("kd", "hidden")), None)
    if attention is None or other is None:
        lacking_side = "attention objective" if attention is None else "vanilla KD or hidden-state transfer"
        return Ranking(init, tuple(ranked), unranked, None, None, None, None, f"not checked: the sweep ranks no {lacking_side}")
    ev = evidence([cells[(t, r.configuration, init)] for r in (attention, other) for t in tasks])
    difference = attention.average - other.average
    return Ranking(init, tuple(ranked), unranked, attention.configuration, other.configuration, difference, ev,
                   direction_verdict(difference, ev))


# --- summaries for MLflow and JSON ----------------------------------------------------------------


def verdicts(claims: Claims) -> dict[int, list[str]]:
    """claim number -> the verdict of each comparison that checked it."""
    found: dict[int, list[str]] = defaultdict(list)
    for gap in claims.gaps:
        if gap.claim is not None:
            found[gap.claim].append(gap.verdict)
    for spread in claims.spreads:
        found[spread.claim].append(spread.verdict)
    for check in claims.qnli:
        found[4].append(check.verdict)
    for rank in claims.rankings:
        if rank.difference is not None:
            found[1].append(rank.verdict)
    return found


def summary(claims: Claims) -> dict[str, str]:
    """`claim_N` -> 'what the paper found; this sweep: agrees 2, not enough seeds to tell 1', for
    every claim once the sweep checks any (a claim it cannot check says so); empty otherwise."""
    if not claims:
        return {}
    found = verdicts(claims)
    lines = {}
    for claim, statement in PAPER.items():
        seen = found.get(claim, [])
        counts = ", ".join(f"{verdict} {seen.count(verdict)}" for verdict in sorted(set(seen))) or "not checked"
        lines[f"claim_{claim}"] = f"{statement}; this sweep: {counts}"
    return lines


def as_json(claims: Claims, value: str, counted: list[str]) -> dict[str, Any]:
    """Every number behind the section, in the units trials report (differences in score 0-1)."""
    return {
        "value": value,
        "counted_outcomes": counted,
        "paper": {str(k): v for k, v in PAPER.items()},
        "summary": summary(claims),
        "init_gaps": [asdict(g) for g in claims.gaps],
        "qnli": [asdict(q) for q in claims.qnli],
        "init_spreads": [asdict(s) for s in claims.spreads],
        "rankings": [asdict(r) for r in claims.rankings],
    }


# --- rendering ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    title: str
    paper: str
    header: tuple[str, ...]
    rows: list[list[str]]
    after: list[str]


def points(score: float | None) -> str:
    return "—" if score is None else f"{100 * score:.1f}"


def signed(score: float | None) -> str:
    return "—" if score is None else f"{100 * score:+.1f}"


def backing(ev: Evidence) -> str:
    """'2 seeds, 8 trials'."""
    return ", ".join(f"{n} {noun}{'' if n == 1 else 's'}" for n, noun in ((ev.seeds, "seed"), (ev.trials, "trial")))


def claim_label(claim: int | None, found: str) -> str:
    return "—" if claim is None else f"{found} (claim {claim})"


def gap_text(gap: InitGap) -> str:
    """'+3.2 (83.3 vs 80.1)': the difference and the two means it is made of."""
    if gap.difference is None:
        return "—"
    return f"{signed(gap.difference)} ({points(gap.lower_mean)} vs {points(gap.higher_mean)})"


def gap_section(claims: Claims) -> Section | None:
    if not claims.gaps:
        return None
    rows = [
        [g.task, g.configuration, f"{g.lower} − {g.higher}",
         gap_text(g),
         points(g.evidence.seed_spread), str(g.evidence.seeds), str(g.evidence.trials),
         claim_label(g.claim, "lower wins" if g.claim == 3 else "little difference"), g.verdict]
        for g in claims.gaps
    ]
    return Section(
        "Lower minus higher teacher layers at initialisation (claims 3, 4)",
        f"Paper: {PAPER[3]}; {PAPER[4]}; attention transfer changes little (claim 5).",
        ("task", "configuration", "inits", "difference (lower vs higher)", "seed spread", "seeds", "trials",
         "paper", "this sweep"),
        rows,
        qnli_lines(claims),
    )


def qnli_lines(claims: Claims) -> list[str]:
    """Claim 4 in a sentence per configuration, or why this sweep cannot check it."""
    if not any(g.claim == 3 for g in claims.gaps):
        return []
    if not claims.qnli:
        tasks = {g.task for g in claims.gaps}
        why = "it has no QNLI task" if "qnli" not in tasks else "it needs a lower-higher gap on QNLI and another task"
        return [f"Claim 4 (largest on QNLI, up to 17.8 points): not checked on this sweep; {why}."]
    return [
        f"Claim 4, {q.configuration} ({q.lower} − {q.higher}): QNLI {signed(q.qnli_gap)} against "
        f"{q.runner_up} {signed(q.runner_up_gap)} (paper: up to {signed(PAPER_QNLI_GAP)} on QNLI); seed spread "
        f"{points(q.evidence.seed_spread)}, {backing(q.evidence)}: {q.verdict}."
        for q in claims.qnli
    ]


def spread_section(claims: Claims) -> Section | None:
    if not claims.spreads:
        return None
    rows = [
        [s.task, s.configuration,
         ", ".join([f"{i} {points(m)}" for i, m in s.means.items()] + [f"{i} —" for i in s.missing]),
         points(s.spread), points(s.evidence.seed_spread), str(s.evidence.seeds), str(s.evidence.trials),
         claim_label(s.claim, "matters" if s.claim == 2 else "within seed noise"), s.verdict]
        for s in claims.spreads
    ]
    return Section(
        "Spread over initialisations against the seed spread (claims 2, 5)",
        f"Paper: {PAPER[2]} (claim 2); {PAPER[5]} (claim 5).",
        ("task", "configuration", "score per init", "spread (max − min)", "seed spread", "seeds", "trials",
         "paper", "this sweep"),
        rows,
        [],
    )


def ranking_sections(claims: Claims) -> list[Section]:
    sections = []
    for rank in claims.rankings:
        rows = [[str(n), r.configuration, r.family, points(r.average), str(r.tasks), str(r.evidence.seeds),
                 str(r.evidence.trials)] for n, r in enumerate(rank.ranked, 1)]
        rows += [["—", configuration, "", why, "", "", ""] for configuration, why in rank.unranked.items()]
        sections.append(Section(
            f"Objectives ranked by task average, init {rank.init} (claim 1)",
            f"Paper: {PAPER[1]}.",
            ("rank", "configuration", "family", "task average", "tasks", "seeds", "trials"),
            rows,
            [ranking_line(rank)],
        ))
    return sections


def ranking_line(rank: Ranking) -> str:
    if rank.evidence is None:
        return f"This sweep: {rank.verdict}."
    return (f"This sweep: {rank.attention} against {rank.other} (the best of vanilla KD and hidden-state "
            f"transfer): {signed(rank.difference)}; seed spread {points(rank.evidence.seed_spread)}, "
            f"{backing(rank.evidence)}: {rank.verdict}.")


def sections(claims: Claims) -> list[Section]:
    return [s for s in (gap_section(claims), spread_section(claims)) if s] + ranking_sections(claims)


TITLE = "Claims of the paper, checked on this sweep"


def explanation(scope: str) -> str:
    return (
        f'What "How to Distill your BERT" (Wang et al., ACL 2023) found, beside what this sweep shows, from '
        f"{scope}. Seed spread: the standard deviation over seeds within a cell, pooled over the cells compared; "
        f'a difference within it, or a cell with one seed, reads "{TOO_FEW_SEEDS}" (a rule of thumb, not a '
        "significance test: more seeds make it sharper). Seeds: the fewest in any "
        "cell compared; trials: those counted in them. Lower: the student copies the teacher's first layers; "
        "it is compared with every other initialisation that copies teacher layers (random and pretrained copy "
        "none)."
    )


def render_markdown(claims: Claims, scope: str) -> list[str]:
    """The section's lines, after the report's tables; none where the sweep varies neither the
    initialisation nor the objective."""
    if not claims:
        return []
    lines = [f"## {TITLE}", "", explanation(scope), ""]
    for section in sections(claims):
        lines += [f"### {section.title}", "", section.paper, "", "| " + " | ".join(section.header) + " |",
                  "|" + "---|" * len(section.header)]
        lines += ["| " + " | ".join(row) + " |" for row in section.rows]
        lines += [""] + [line for text in section.after for line in (text, "")]
    return lines


def render_html(claims: Claims, scope: str) -> list[str]:
    if not claims:
        return []
    parts = [f"<h2>{html.escape(TITLE)}</h2>", f"<p>{html.escape(explanation(scope))}</p>"]
    for section in sections(claims):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in section.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in section.rows)
        parts += [f"<h3>{html.escape(section.title)}</h3>", f"<p>{html.escape(section.paper)}</p>",
                  f"<table class='claims'><tr>{head}</tr>{body}</table>"]
        parts += [f"<p>{html.escape(text)}</p>" for text in section.after]
    return parts
