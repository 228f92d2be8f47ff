"""Each objective against a value computed by hand, element by element, on tiny tensors.

The references below use Python loops over numpy float64 arrays and share no code with
`trainables.objectives`. Shapes: B=2 sentences, T=4 tokens, H=2 heads of width 3; the student has
2 layers, the teacher 4; the second sentence is padded (two real tokens) unless stated.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from trainables.objectives import REGISTRY, ContrastiveMemory, ModuleContext, Reads, Stage
from trainables.views import DistillBatch, LayerPairs, ModelView

B, T, H, DH = 2, 4, 2, 3
STUDENT_LAYERS, TEACHER_LAYERS = 2, 4
MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]
NO_PADDING = [[1, 1, 1, 1], [1, 1, 1, 1]]
ONE_REAL_TOKEN = [[1, 1, 1, 1], [1, 0, 0, 0]]
PAIRS = LayerPairs(hidden=((0, 0), (1, 2), (2, 4)), attention=((0, 1), (1, 3)))
COMBINE = LayerPairs(hidden=(), attention=((0, 1), (1, 3)), combine=True)
TRAIN_LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
EXAMPLE_IDS = torch.tensor([1, 6])


def make_view(layers: int, seed: int, heads: int = H, head_dim: int = DH) -> ModelView:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    width = heads * head_dim
    return ModelView(
        logits=rnd(B, 3),
        hidden_states=tuple(rnd(B, T, width) for _ in range(layers + 1)),
        queries=[rnd(B, heads, T, head_dim) for _ in range(layers)],
        keys=[rnd(B, heads, T, head_dim) for _ in range(layers)],
        values=[rnd(B, heads, T, head_dim) for _ in range(layers)],
    )


def make_batch(
    mask: list[list[int]] = MASK,
    count_padding: bool = False,
    pairs: LayerPairs = PAIRS,
    student: ModelView | None = None,
    teacher: ModelView | None = None,
) -> DistillBatch:
    return DistillBatch(
        student=student or make_view(STUDENT_LAYERS, seed=1),
        teacher=teacher or make_view(TEACHER_LAYERS, seed=2),
        attention_mask=torch.tensor(mask),
        labels=TRAIN_LABELS[EXAMPLE_IDS],
        example_ids=EXAMPLE_IDS,
        pairs=pairs,
        count_padding=count_padding,
    )


def context(batch: DistillBatch, train_labels: torch.Tensor | None = TRAIN_LABELS) -> ModuleContext:
    return ModuleContext(
        student_hidden_size=batch.student.hidden_states[0].shape[-1],
        teacher_hidden_size=batch.teacher.hidden_states[0].shape[-1],
        student_layers=batch.student.num_layers,
        teacher_layers=batch.teacher.num_layers,
        num_train_examples=len(TRAIN_LABELS),
        train_labels=train_labels,
        combine=batch.pairs.combine,
    )


def build(name: str, batch: DistillBatch, **raw: object) -> tuple[object, torch.nn.Module | None]:
    obj = REGISTRY[name]
    params = obj.parse_params(raw)
    module = obj.build_module(context(batch), params) if obj.build_module else None
    return params, module


def run(name: str, batch: DistillBatch, **raw: object) -> float:
    params, module = build(name, batch, **raw)
    return REGISTRY[name].compute(batch, params, module).item()


# --- hand references ----------------------------------------------------------------------------


def arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def softmax_over(row: list[float], keep: list[bool]) -> list[float]:
    """Softmax of the kept entries; dropped entries get probability 0."""
    top = max(x for x, k in zip(row, keep) if k)
    exps = [math.exp(x - top) if k else 0.0 for x, k in zip(row, keep)]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) with q clamped at 1e-7, 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(max(qi, 1e-7))) for pi, qi in zip(p, q) if pi > 0)


def scaled_dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[B, H, T, T] of sum_d x[b,h,q,d] * y[b,h,k,d] / sqrt(d), one element at a time."""
    b_, h_, t_, d_ = x.shape
    out = np.zeros((b_, h_, t_, t_))
    for b, h, q, k in itertools.product(range(b_), range(h_), range(t_), range(t_)):
        out[b, h, q, k] = sum(x[b, h, q, e] * y[b, h, k, e] for e in range(d_)) / math.sqrt(d_)
    return out


def ref_kd(student: np.ndarray, teacher: np.ndarray, temp: float) -> float:
    total = 0.0
    for b in range(student.shape[0]):
        p_t = softmax_over([z / temp for z in teacher[b]], [True] * teacher.shape[1])
        p_s = softmax_over([z / temp for z in student[b]], [True] * student.shape[1])
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return temp * temp * total / student.shape[0]


def ref_mse(s: np.ndarray, t: np.ndarray, mask: list[list[int]] | None) -> float:
    """Mean over (b, token, feature) of [B, T, d] arrays, real tokens only unless mask is None."""
    num, den = 0.0, 0
    for b, tok, f in itertools.product(range(s.shape[0]), range(s.shape[1]), range(s.shape[2])):
        if mask is None or mask[b][tok]:
            num += (s[b, tok, f] - t[b, tok, f]) ** 2
            den += 1
    return num / den


def ref_linear(x: np.ndarray, layer: torch.nn.Linear) -> np.ndarray:
    return x @ arr(layer.weight).T + arr(layer.bias)


def ref_att_mse(batch: DistillBatch, tensor: str = "scores") -> float:
    mask, total = batch.attention_mask.tolist(), 0.0
    for i, j in batch.pairs.attention:
        s = scaled_dots(arr(batch.student.queries[i]), arr(batch.student.keys[i]))
        t = scaled_dots(arr(batch.teacher.queries[j]), arr(batch.teacher.keys[j]))
        num, den = 0.0, 0
        for b, h, q in itertools.product(range(B), range(H), range(T)):
            keep = [bool(m) for m in mask[b]]
            if tensor == "probs":
                s_row, t_row = softmax_over(list(s[b, h, q]), keep), softmax_over(list(t[b, h, q]), keep)
            else:
                s_row = [x if k else 0.0 for x, k in zip(s[b, h, q], keep)]
                t_row = [x if k else 0.0 for x, k in zip(t[b, h, q], keep)]
            for k in range(T):
                if batch.count_padding or (mask[b][q] and mask[b][k]):
                    num += (s_row[k] - t_row[k]) ** 2
                    den += 1
        total += num / den
    return total


def ref_row_kl(s_scores: np.ndarray, t_scores: np.ndarray, mask: list[list[int]], mask_keys: bool,
               count_rows: bool) -> float:
    """Mean over (b, h, q) rows of KL(softmax T row || softmax S row)."""
    num, den = 0.0, 0
    for b, h, q in itertools.product(range(s_scores.shape[0]), range(s_scores.shape[1]), range(T)):
        if count_rows or mask[b][q]:
            keep = [bool(m) or not mask_keys for m in mask[b]]
            num += kl(softmax_over(list(t_scores[b, h, q]), keep), softmax_over(list(s_scores[b, h, q]), keep))
            den += 1
    return num / den


def ref_att_kl(batch: DistillBatch) -> float:
    mask = batch.attention_mask.tolist()
    return sum(
        ref_row_kl(
            scaled_dots(arr(batch.student.queries[i]), arr(batch.student.keys[i])),
            scaled_dots(arr(batch.teacher.queries[j]), arr(batch.teacher.keys[j])),
            mask, mask_keys=True, count_rows=batch.count_padding,
        )
        for i, j in batch.pairs.attention
    )


def ref_relation_kl(s: np.ndarray, t: np.ndarray, batch: DistillBatch) -> float:
    """Self-relation KL: no mask at all with count_padding, else masked keys and real rows."""
    clean = not batch.count_padding
    return ref_row_kl(scaled_dots(s, s), scaled_dots(t, t), batch.attention_mask.tolist(),
                      mask_keys=clean, count_rows=not clean)


def ref_split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """Merge [B, H, T, d_h] to [B, T, H*d_h] element by element, then cut into `heads` heads."""
    b_, h_, t_, d_ = x.shape
    merged = np.zeros((b_, t_, h_ * d_))
    for b, h, tok, e in itertools.product(range(b_), range(h_), range(t_), range(d_)):
        merged[b, tok, h * d_ + e] = x[b, h, tok, e]
    width = h_ * d_ // heads
    out = np.zeros((b_, heads, t_, width))
    for b, r, tok, e in itertools.product(range(b_), range(heads), range(t_), range(width)):
        out[b, r, tok, e] = merged[b, tok, r * width + e]
    return out


def ref_minilm_v2(batch: DistillBatch, heads: int) -> float:
    total = 0.0
    for i, j in batch.pairs.attention:
        for kind in ("queries", "keys", "values"):
            s = ref_split_heads(arr(getattr(batch.student, kind)[i]), heads)
            t = ref_split_heads(arr(getattr(batch.teacher, kind)[j]), heads)
            total += ref_relation_kl(s, t, batch)
    return total


def unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(x * x for x in v))


def ref_nce(anchors: list[np.ndarray], memory: np.ndarray, candidates: list[list[int]], tau: float) -> float:
    """One CRD direction with Z fixed from this batch as mean(s) * N."""
    n, k = memory.shape[0], len(candidates[0]) - 1
    raw = [[math.exp(float(memory[c] @ g) / tau) for c in row] for g, row in zip(anchors, candidates)]
    z = sum(sum(r) for r in raw) / sum(len(r) for r in raw) * n
    noise = k / n
    total = 0.0
    for row in raw:
        s = [x / z for x in row]
        total += math.log(s[0] / (s[0] + noise)) + sum(math.log(noise / (x + noise)) for x in s[1:])
    return -total / len(raw)


# --- kd -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_equals_t_squared_kl_computed_by_hand(temperature: float) -> None:
    batch = make_batch()
    expected = ref_kd(arr(batch.student.logits), arr(batch.teacher.logits), temperature)
    assert run("kd", batch, temperature=temperature) == pytest.approx(expected, rel=1e-5)


def test_kd_on_a_regression_head_is_the_mse_to_the_teacher_prediction() -> None:
    batch = make_batch()
    batch.student.logits, batch.teacher.logits = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [0.0]])
    assert run("kd", batch) == pytest.approx((0.25 + 4.0) / 2)


# --- logit_mse ----------------------------------------------------------------------------------


def ref_logit_mse(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean over sentences of sum over outputs of (z_S - z_T)^2."""
    total = 0.0
    for b in range(len(student)):
        total += sum((s - t) ** 2 for s, t in zip(student[b], teacher[b]))
    return total / len(student)


def test_logit_mse_is_the_mean_over_sentences_of_the_squared_logit_distance() -> None:
    batch = make_batch()
    expected = ref_logit_mse(arr(batch.student.logits), arr(batch.teacher.logits))
    assert run("logit_mse", batch) == pytest.approx(expected, rel=1e-5)


def test_logit_mse_on_a_regression_head_is_kds_regression_loss() -> None:
    batch = make_batch()
    batch.student.logits, batch.teacher.logits = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [0.0]])
    assert run("logit_mse", batch) == pytest.approx((0.25 + 4.0) / 2) == run("kd", batch)


def test_logit_mse_reads_only_logits_so_it_trains_the_prediction_layer_without_hooks() -> None:
    objective = REGISTRY["logit_mse"]
    assert objective.reads == {Reads.LOGITS}
    assert objective.stage is Stage.PREDICTION and not objective.needs_qkv and not objective.needs_labels


# --- hidden states ------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [MASK, NO_PADDING])
@pytest.mark.parametrize("count_padding", [False, True])
def test_hidden_mse_sums_per_pair_mse_over_real_tokens(mask: list[list[int]], count_padding: bool) -> None:
    batch = make_batch(mask, count_padding)
    s, t = batch.student.hidden_states, batch.teacher.hidden_states
    expected = sum(ref_mse(arr(s[i]), arr(t[j]), None if count_padding else mask) for i, j in PAIRS.hidden)
    assert run("hidden_mse", batch) == pytest.approx(expected, rel=1e-5)


def test_hidden_mse_ignores_padded_tokens_unless_count_padding() -> None:
    clean, authors = make_batch(), make_batch(count_padding=True)
    moved = make_view(STUDENT_LAYERS, seed=1)
    for h in moved.hidden_states:
        h[1, 2:] = 50.0
    assert run("hidden_mse", make_batch(student=moved)) == pytest.approx(run("hidden_mse", clean))
    assert run("hidden_mse", make_batch(count_padding=True, student=moved)) > run("hidden_mse", authors) + 100


def test_hidden_mse_builds_no_module_when_widths_agree() -> None:
    assert build("hidden_mse", make_batch())[1] is None
    assert build("hidden_mse_token", make_batch())[1] is None


@pytest.mark.parametrize("count_padding", [False, True])
def test_hidden_mse_combine_projects_the_teacher_concat_into_student_space(count_padding: bool) -> None:
    batch = make_batch(count_padding=count_padding, pairs=COMBINE)
    params, module = build("hidden_mse", batch)
    assert isinstance(module, torch.nn.Linear)
    assert (module.in_features, module.out_features) == ((TEACHER_LAYERS + 1) * H * DH, (STUDENT_LAYERS + 1) * H * DH)
    s = np.concatenate([arr(h) for h in batch.student.hidden_states], axis=-1)
    t = np.concatenate([arr(h) for h in batch.teacher.hidden_states], axis=-1)
    expected = ref_mse(s, ref_linear(t, module), None if count_padding else MASK)
    loss = REGISTRY["hidden_mse"].compute(batch, params, module)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def width_mismatch_batch(pairs: LayerPairs = PAIRS) -> DistillBatch:
    return make_batch(pairs=pairs, student=make_view(STUDENT_LAYERS, seed=1, head_dim=2))


def test_hidden_mse_maps_a_narrower_student_to_the_teacher_width_per_pair() -> None:
    batch = width_mismatch_batch()
    params, module = build("hidden_mse", batch)
    assert isinstance(module, torch.nn.ModuleList) and len(module) == STUDENT_LAYERS + 1
    assert (module[0].in_features, module[0].out_features) == (H * 2, H * DH)
    s, t = batch.student.hidden_states, batch.teacher.hidden_states
    expected = sum(ref_mse(ref_linear(arr(s[i]), module[i]), arr(t[j]), MASK) for i, j in PAIRS.hidden)
    loss = REGISTRY["hidden_mse"].compute(batch, params, module)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(module[i].weight.grad.abs().sum() > 0 for i, _ in PAIRS.hidden)


@pytest.mark.parametrize("mask", [MASK, ONE_REAL_TOKEN])
def test_hidden_mse_token_compares_only_the_first_token(mask: list[list[int]]) -> None:
    batch = make_batch(mask)
    s, t = batch.student.hidden_states, batch.teacher.hidden_states
    expected = sum(ref_mse(arr(s[i][:, :1]), arr(t[j][:, :1]), None) for i, j in PAIRS.hidden)
    assert run("hidden_mse_token", batch) == pytest.approx(expected, rel=1e-5)


def test_hidden_mse_token_combine_concatenates_the_first_token_vectors() -> None:
    batch = make_batch(pairs=COMBINE)
    params, module = build("hidden_mse_token", batch)
    s = np.concatenate([arr(h[:, :1]) for h in batch.student.hidden_states], axis=-1)
    t = np.concatenate([arr(h[:, :1]) for h in batch.teacher.hidden_states], axis=-1)
    expected = ref_mse(s, ref_linear(t, module), None)
    loss = REGISTRY["hidden_mse_token"].compute(batch, params, module)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert module.weight.grad.abs().sum() > 0


def test_hidden_mse_token_maps_a_narrower_student_to_the_teacher_width() -> None:
    batch = width_mismatch_batch()
    params, module = build("hidden_mse_token", batch)
    s, t = batch.student.hidden_states, batch.teacher.hidden_states
    expected = sum(
        ref_mse(ref_linear(arr(s[i][:, :1]), module[i]), arr(t[j][:, :1]), None) for i, j in PAIRS.hidden
    )
    assert REGISTRY["hidden_mse_token"].compute(batch, params, module).item() == pytest.approx(expected, rel=1e-5)


# --- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [MASK, NO_PADDING, ONE_REAL_TOKEN])
@pytest.mark.parametrize("count_padding", [False, True])
@pytest.mark.parametrize("tensor", ["scores", "probs"])
def test_att_mse_matches_hand_computed_value(mask: list[list[int]], count_padding: bool, tensor: str) -> None:
    batch = make_batch(mask, count_padding)
    assert run("att_mse", batch, tensor=tensor) == pytest.approx(ref_att_mse(batch, tensor), rel=1e-5)


def with_padded_positions_moved(kind: str) -> ModelView:
    """The student of make_batch with its `kind` tensors set to 30 at the padded tokens."""
    view = make_view(STUDENT_LAYERS, seed=1)
    for x in getattr(view, kind):
        x[1, :, 2:] = 30.0
    return view


@pytest.mark.parametrize("count_padding", [False, True])
def test_att_mse_ignores_padded_keys(count_padding: bool) -> None:
    moved = make_batch(count_padding=count_padding, student=with_padded_positions_moved("keys"))
    assert run("att_mse", moved) == pytest.approx(run("att_mse", make_batch(count_padding=count_padding)))


def test_att_mse_counts_padded_query_rows_only_with_count_padding() -> None:
    moved = with_padded_positions_moved("queries")
    assert run("att_mse", make_batch(student=moved)) == pytest.approx(run("att_mse", make_batch()))
    assert run("att_mse", make_batch(count_padding=True, student=moved)) > run(
        "att_mse", make_batch(count_padding=True)
    ) + 1.0


def test_att_mse_count_padding_divides_by_all_entries() -> None:
    """Padded keys are zeroed, so on padded rows only real keys differ; the denominator is B*H*T*T."""
    clean, authors = make_batch(), make_batch(count_padding=True)
    assert run("att_mse", clean) != pytest.approx(run("att_mse", authors))
    no_pad_clean, no_pad_authors = make_batch(NO_PADDING), make_batch(NO_PADDING, count_padding=True)
    assert run("att_mse", no_pad_clean) == pytest.approx(run("att_mse", no_pad_authors))


@pytest.mark.parametrize("mask", [MASK, NO_PADDING, ONE_REAL_TOKEN])
@pytest.mark.parametrize("count_padding", [False, True])
def test_att_kl_matches_hand_computed_mean_row_kl(mask: list[list[int]], count_padding: bool) -> None:
    batch = make_batch(mask, count_padding)
    assert run("att_kl", batch) == pytest.approx(ref_att_kl(batch), rel=1e-5)


def test_att_kl_ignores_padded_keys() -> None:
    moved = make_batch(student=with_padded_positions_moved("keys"))
    assert run("att_kl", moved) == pytest.approx(run("att_kl", make_batch()))


@pytest.mark.parametrize("mask", [MASK, NO_PADDING])
@pytest.mark.parametrize("count_padding", [False, True])
def test_minilm_is_att_kl_plus_value_relation_kl(mask: list[list[int]], count_padding: bool) -> None:
    batch = make_batch(mask, count_padding)
    values = sum(
        ref_relation_kl(arr(batch.student.values[i]), arr(batch.teacher.values[j]), batch)
        for i, j in PAIRS.attention
    )
    assert run("minilm", batch) == pytest.approx(ref_att_kl(batch) + values, rel=1e-5)


def test_minilm_value_relation_ignores_padding_unless_count_padding() -> None:
    moved = with_padded_positions_moved("values")
    assert run("minilm", make_batch(student=moved)) == pytest.approx(run("minilm", make_batch()))
    assert run("minilm", make_batch(count_padding=True, student=moved)) != pytest.approx(
        run("minilm", make_batch(count_padding=True))
    )


@pytest.mark.parametrize("relation_heads", [None, 3, 6])
@pytest.mark.parametrize("count_padding", [False, True])
def test_minilm_v2_matches_hand_computed_relations(relation_heads: int | None, count_padding: bool) -> None:
    batch = make_batch(count_padding=count_padding)
    expected = ref_minilm_v2(batch, relation_heads or H)
    assert run("minilm_v2", batch, relation_heads=relation_heads) == pytest.approx(expected, rel=1e-5)


def test_minilm_v2_accepts_a_student_with_another_head_count() -> None:
    batch = make_batch(student=make_view(STUDENT_LAYERS, seed=1, heads=3, head_dim=2))
    assert run("minilm_v2", batch) == pytest.approx(ref_minilm_v2(batch, H), rel=1e-5)


def test_minilm_v2_rejects_relation_heads_that_do_not_divide_the_width() -> None:
    with pytest.raises(ValueError, match="relation_heads 4"):
        run("minilm_v2", make_batch(), relation_heads=4)


# --- the task-agnostic methods: hidden_mse_combine, pear_col, att_val_two_stage -----------------


@pytest.mark.parametrize("pairs", [PAIRS, COMBINE, LayerPairs(hidden=((2, 4),), attention=((1, 3),))])
@pytest.mark.parametrize("count_padding", [False, True])
def test_hidden_mse_combine_projects_the_teachers_layers_onto_the_students_whatever_the_mapping(
    pairs: LayerPairs, count_padding: bool
) -> None:
    batch = make_batch(count_padding=count_padding, pairs=pairs)
    params, module = build("hidden_mse_combine", batch)
    assert isinstance(module, torch.nn.Linear)
    assert (module.in_features, module.out_features) == (TEACHER_LAYERS * H * DH, STUDENT_LAYERS * H * DH)
    s = np.concatenate([arr(h) for h in batch.student.hidden_states[1:]], axis=-1)  # no embeddings
    t = np.concatenate([arr(h) for h in batch.teacher.hidden_states[1:]], axis=-1)
    expected = ref_mse(s, ref_linear(t, module), None if count_padding else MASK)
    loss = REGISTRY["hidden_mse_combine"].compute(batch, params, module)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def probabilities(x: np.ndarray, y: np.ndarray, mask: list[list[int]]) -> np.ndarray:
    """[B, H, T, T] attention probabilities over the real keys, from queries x and keys y."""
    scores, out = scaled_dots(x, y), np.zeros((B, H, T, T))
    for b, h, q in itertools.product(range(B), range(H), range(T)):
        out[b, h, q] = softmax_over(list(scores[b, h, q]), [bool(m) for m in mask[b]])
    return out


def ref_one_minus_mean_pearson(s: np.ndarray, t: np.ndarray, weight: np.ndarray, dim: int) -> float:
    """1 - the mean over vectors along `dim` (those with two or more weighted entries) of the Pearson
    correlation of their weighted entries; eps 1e-8 in the denominator, as the study's code."""
    others = [d for d in range(4) if d != dim]
    correlations = []
    for index in itertools.product(*(range(s.shape[d]) for d in others)):
        entries = []
        for x in range(s.shape[dim]):
            at = list(index)
            at.insert(dim, x)
            if weight[tuple(at)]:
                entries.append((s[tuple(at)], t[tuple(at)]))
        if len(entries) < 2:
            continue
        mean_s = sum(a for a, _ in entries) / len(entries)
        mean_t = sum(b for _, b in entries) / len(entries)
        num = sum((a - mean_s) * (b - mean_t) for a, b in entries)
        norm_s = math.sqrt(sum((a - mean_s) ** 2 for a, _ in entries))
        norm_t = math.sqrt(sum((b - mean_t) ** 2 for _, b in entries))
        correlations.append(num / (norm_s * norm_t + 1e-8))
    return 1.0 - (sum(correlations) / len(correlations) if correlations else 0.0)


def ref_pear_col(batch: DistillBatch) -> float:
    """Sum over the four views (keys, queries, heads, sentences) of the last attention pair."""
    mask = batch.attention_mask.tolist()
    i, j = batch.pairs.attention[-1]
    s = probabilities(arr(batch.student.queries[i]), arr(batch.student.keys[i]), mask)
    t = probabilities(arr(batch.teacher.queries[j]), arr(batch.teacher.keys[j]), mask)
    weight = np.ones((B, H, T, T))
    if not batch.count_padding:
        for b, h, q, k in itertools.product(range(B), range(H), range(T), range(T)):
            weight[b, h, q, k] = mask[b][q] * mask[b][k]
    return sum(ref_one_minus_mean_pearson(s, t, weight, dim) for dim in (3, 2, 1, 0))


@pytest.mark.parametrize("mask", [MASK, NO_PADDING, ONE_REAL_TOKEN])
@pytest.mark.parametrize("count_padding", [False, True])
def test_pear_col_matches_four_hand_computed_pearson_views(mask: list[list[int]], count_padding: bool) -> None:
    batch = make_batch(mask, count_padding)
    assert run("pear_col", batch) == pytest.approx(ref_pear_col(batch), rel=1e-5)


def test_pear_col_reads_only_the_last_attention_pair_and_vanishes_when_it_matches() -> None:
    batch = make_batch()
    other_first_pair = make_view(STUDENT_LAYERS, seed=1)
    other_first_pair.queries[0] = other_first_pair.queries[0] * 3.0
    assert run("pear_col", make_batch(student=other_first_pair)) == pytest.approx(run("pear_col", batch))
    mirror = make_view(STUDENT_LAYERS, seed=1)
    mirror.queries[1], mirror.keys[1] = batch.teacher.queries[3], batch.teacher.keys[3]
    # not exactly 0: the 1e-8 in the denominator weighs on two-entry vectors of near-equal probabilities
    assert run("pear_col", make_batch(student=mirror)) == pytest.approx(0.0, abs=1e-4)


def test_pear_col_ignores_padded_positions() -> None:
    moved = make_batch(student=with_padded_positions_moved("queries"))
    assert run("pear_col", moved) == pytest.approx(run("pear_col", make_batch()))


@pytest.mark.parametrize("count_padding", [False, True])
def test_att_val_two_stage_distils_with_minilms_attention_and_value_relations(count_padding: bool) -> None:
    batch = make_batch(count_padding=count_padding)
    values = sum(
        ref_relation_kl(arr(batch.student.values[i]), arr(batch.teacher.values[j]), batch)
        for i, j in PAIRS.attention
    )
    assert run("att_val_two_stage", batch) == pytest.approx(ref_att_kl(batch) + values, rel=1e-5)
    objective = REGISTRY["att_val_two_stage"]
    assert objective.own_loss_first and not objective.reads & {Reads.LOGITS, Reads.LABELS}
    assert not any(o.own_loss_first for name, o in REGISTRY.items() if name != "att_val_two_stage")


# --- crd ----------------------------------------------------------------------------------------


CRD_PARAMS = {"nce_k": 5, "feat_dim": 4}


def test_crd_matches_hand_computed_nce_loss() -> None:
    batch = make_batch()
    params, module = build("crd", batch, **CRD_PARAMS)
    memory_s, memory_t = arr(module.memory_student), arr(module.memory_teacher)
    rng = torch.get_rng_state()
    loss = REGISTRY["crd"].compute(batch, params, module).item()
    torch.set_rng_state(rng)
    negatives = module.draw_negatives(EXAMPLE_IDS, params.nce_k).tolist()
    candidates = [[int(i)] + row for i, row in zip(EXAMPLE_IDS, negatives)]

    def embeds(view: ModelView, layer: torch.nn.Linear) -> list[np.ndarray]:
        features = np.concatenate([arr(h[:, 0]) for h in view.hidden_states], axis=-1)
        return [unit(f) for f in ref_linear(features, layer)]

    g_s, g_t = embeds(batch.student, module.embed_student), embeds(batch.teacher, module.embed_teacher)
    expected = (ref_nce(g_s, memory_t, candidates, 0.07) + ref_nce(g_t, memory_s, candidates, 0.07)) / 2
    assert loss == pytest.approx(expected, rel=1e-4)


def test_crd_memory_starts_uniform_in_the_documented_range() -> None:
    _, module = build("crd", make_batch(), feat_dim=12)
    bound = 1 / math.sqrt(12 / 3)
    assert module.memory_student.shape == (len(TRAIN_LABELS), 12)
    assert module.memory_student.abs().max() <= bound and module.memory_teacher.abs().max() <= bound


def test_crd_label_aware_negatives_never_share_the_anchor_label() -> None:
    _, module = build("crd", make_batch(), **CRD_PARAMS)
    anchors = torch.arange(len(TRAIN_LABELS)).repeat(20)
    negatives = module.draw_negatives(anchors, 50)
    assert (TRAIN_LABELS[negatives] != TRAIN_LABELS[anchors][:, None]).all()
    for label in range(3):  # every example of another label is reachable
        drawn = set(negatives[TRAIN_LABELS[anchors] == label].flatten().tolist())
        assert drawn == set((TRAIN_LABELS != label).nonzero().flatten().tolist())


@pytest.mark.parametrize("train_labels", [TRAIN_LABELS, None, TRAIN_LABELS.float()])
def test_crd_uniform_negatives_cover_all_other_examples(train_labels: torch.Tensor | None) -> None:
    """label_aware_negatives off, or a regression task: uniform over every example but the anchor."""
    batch = make_batch()
    params = REGISTRY["crd"].parse_params({"label_aware_negatives": train_labels is not TRAIN_LABELS})
    module = ContrastiveMemory(context(batch, train_labels), params)
    anchors = torch.arange(len(TRAIN_LABELS)).repeat(20)
    negatives = module.draw_negatives(anchors, 50)
    assert (negatives != anchors[:, None]).all()
    for anchor in range(len(TRAIN_LABELS)):
        assert set(negatives[anchors == anchor].flatten().tolist()) == set(range(len(TRAIN_LABELS))) - {anchor}


def test_crd_memory_rows_of_the_batch_move_and_stay_normalised() -> None:
    batch = make_batch()
    params, module = build("crd", batch, **CRD_PARAMS)
    before_s, before_t = module.memory_student.clone(), module.memory_teacher.clone()
    REGISTRY["crd"].compute(batch, params, module).backward()
    others = torch.tensor([i for i in range(len(TRAIN_LABELS)) if i not in EXAMPLE_IDS.tolist()])
    for before, after in ((before_s, module.memory_student), (before_t, module.memory_teacher)):
        assert not torch.allclose(before[EXAMPLE_IDS], after[EXAMPLE_IDS])
        assert torch.equal(before[others], after[others])
        assert torch.allclose(after[EXAMPLE_IDS].norm(dim=-1), torch.ones(B))
    assert module.z_student > 0 and module.z_teacher > 0


def test_crd_leaves_memory_alone_in_eval_mode() -> None:
    batch = make_batch()
    params, module = build("crd", batch, **CRD_PARAMS)
    before = module.memory_student.clone()
    module.eval()
    REGISTRY["crd"].compute(batch, params, module)
    assert torch.equal(before, module.memory_student)


def test_crd_checkpoints_its_memory_and_normalisers() -> None:
    _, module = build("crd", make_batch(), **CRD_PARAMS)
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= set(module.state_dict())


def test_crd_negatives_repeat_after_restoring_the_rng_state() -> None:
    _, module = build("crd", make_batch(), **CRD_PARAMS)
    state = torch.get_rng_state()
    first = module.draw_negatives(EXAMPLE_IDS, 5)
    torch.set_rng_state(state)
    assert torch.equal(first, module.draw_negatives(EXAMPLE_IDS, 5))


# --- every objective ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("count_padding", [False, True])
def test_every_objective_is_finite_on_padded_batches(name: str, count_padding: bool) -> None:
    """One sentence with a single real token, and extreme values at its padded positions."""
    student = make_view(STUDENT_LAYERS, seed=1)
    for x in (*student.hidden_states, *student.queries, *student.keys, *student.values):
        x[1, ..., 1:, :] = 1e4
    batch = make_batch(ONE_REAL_TOKEN, count_padding, student=student)
    assert math.isfinite(run(name, batch))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_objective_sends_a_gradient_to_the_student(name: str) -> None:
    student = make_view(STUDENT_LAYERS, seed=1)
    leaves = [student.logits, *student.hidden_states, *student.queries, *student.keys, *student.values]
    for x in leaves:
        x.requires_grad_(True)
    batch = make_batch(student=student)
    params, module = build(name, batch)
    REGISTRY[name].compute(batch, params, module).backward()
    grads = [x.grad for x in leaves if x.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_registry_rejects_unknown_params_naming_the_objective() -> None:
    with pytest.raises(ValueError, match="(?s)'kd'.*temprature"):
        REGISTRY["kd"].parse_params({"temprature": 2})


@pytest.mark.parametrize("raw", [{"tensor": "weights"}, {"relation_heads": 0}])
def test_registry_rejects_invalid_param_values(raw: dict[str, object]) -> None:
    name = "att_mse" if "tensor" in raw else "minilm_v2"
    with pytest.raises(ValueError, match=name):
        REGISTRY[name].parse_params(raw)
