"""Which teacher layers a student copies at initialisation and learns from during distillation.

Layer numbers are 0-based transformer layers (teacher layer 11 is the top of a 12-layer BERT);
hidden-state indices add one because index 0 is the embedding output.
"""

from __future__ import annotations

from trainables.views import LayerPairs


def skip_layers(teacher_layers: int, student_layers: int, floor: bool = False) -> list[int]:
    """Every (L_T / L_S)-th teacher layer, ending at the top: 3, 7, 11 for 3 of 12.

    Equals the study's `j * floor(L_T/L_S)` when L_T is divisible by L_S; otherwise it spreads the
    picks evenly instead of silently skipping the top layers (paper_spec section 10): 1, 4, 6, 9, 11
    for 5 of 12. `floor` (the authors' behaviour) takes the study's picks: 1, 3, 5, 7, 9. A student
    deeper than its teacher learns from teacher layer 0 where a pick would fall below it.
    """
    if floor:
        step = teacher_layers // student_layers
        return [max(0, (j + 1) * step - 1) for j in range(student_layers)]
    return [max(0, round((j + 1) * teacher_layers / student_layers) - 1) for j in range(student_layers)]


def init_layers(init: str | list[int], teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers copied into student layers 0..k-1 for a layer-copying initialisation."""
    if isinstance(init, list):
        return list(init)
    if init == "lower":
        return list(range(student_layers))
    if init == "upper":
        return list(range(teacher_layers - student_layers, teacher_layers))
    if init == "skip":
        return skip_layers(teacher_layers, student_layers)
    raise ValueError(f"student.init {init!r} copies no teacher layers")


def layer_pairs(mapping: str | list[int], teacher_layers: int, student_layers: int, floor: bool = False) -> LayerPairs:
    """Pairs for the hidden-state and attention objectives.

    `skip`: student layer j learns from skip_layers()[j] (`floor`: the study's picks for depths that
    do not divide); hidden objectives also match embeddings.
    `last`: hidden objectives match only the top layers; attention objectives keep `skip`
    (the study's code applies `--mapping` to hidden-state objectives only).
    `combine`: hidden objectives use all layers through a learned projection; attention keeps `skip`.
    An explicit list [t_0, ..., t_{m-1}] maps the student's top m layers, in order, to those teacher
    layers for every objective (MiniLM-style `[11]` matches the two top layers); embeddings are
    matched too when the list covers every student layer.
    """
    skip = skip_layers(teacher_layers, student_layers, floor)
    skip_attention = tuple(enumerate(skip))
    embeddings = ((0, 0),)
    if isinstance(mapping, list):
        first = student_layers - len(mapping)
        attention = tuple((first + k, t) for k, t in enumerate(mapping))
        whole = embeddings if len(mapping) == student_layers else ()
        hidden = whole + tuple((s + 1, t + 1) for s, t in attention)
        return LayerPairs(hidden=hidden, attention=attention)
    if mapping == "skip":
        hidden = embeddings + tuple((s + 1, t + 1) for s, t in skip_attention)
        return LayerPairs(hidden=hidden, attention=skip_attention)
    if mapping == "last":
        return LayerPairs(hidden=((student_layers, teacher_layers),), attention=skip_attention)
    if mapping == "combine":
        return LayerPairs(hidden=(), attention=skip_attention, combine=True)
    raise ValueError(f"mapping {mapping!r}: expected skip, last, combine or a list of teacher layers")
