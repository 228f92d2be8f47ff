"""Layer pairing and initialisation presets, as documented in trainables.mapping."""

from __future__ import annotations

import pytest

from trainables.mapping import init_layers, layer_pairs, skip_layers


def test_skip_picks_every_fourth_layer_ending_at_top_for_3_of_12() -> None:
    assert skip_layers(12, 3) == [3, 7, 11]


def test_skip_for_6_of_12_matches_study_even_layers() -> None:
    assert skip_layers(12, 6) == [1, 3, 5, 7, 9, 11]


def test_skip_reaches_top_layer_when_depths_do_not_divide() -> None:
    picks = skip_layers(12, 5)
    assert picks[-1] == 11 and picks == sorted(set(picks)) and len(picks) == 5


@pytest.mark.parametrize(
    ("init", "expected"),
    [("lower", [0, 1, 2]), ("upper", [9, 10, 11]), ("skip", [3, 7, 11]), ([0, 7, 11], [0, 7, 11])],
)
def test_init_presets_name_the_documented_teacher_layers(init, expected) -> None:
    assert init_layers(init, teacher_layers=12, student_layers=3) == expected


def test_skip_mapping_pairs_embeddings_and_every_fourth_layer() -> None:
    pairs = layer_pairs("skip", teacher_layers=12, student_layers=3)
    assert pairs.hidden == ((0, 0), (1, 4), (2, 8), (3, 12))
    assert pairs.attention == ((0, 3), (1, 7), (2, 11))
    assert not pairs.combine


def test_last_mapping_pairs_only_top_hidden_states_and_keeps_skip_for_attention() -> None:
    pairs = layer_pairs("last", teacher_layers=12, student_layers=3)
    assert pairs.hidden == ((3, 12),)
    assert pairs.attention == ((0, 3), (1, 7), (2, 11))


def test_combine_mapping_flags_learned_projection() -> None:
    pairs = layer_pairs("combine", teacher_layers=12, student_layers=3)
    assert pairs.combine and pairs.hidden == ()


def test_explicit_full_mapping_includes_embeddings() -> None:
    pairs = layer_pairs([0, 5, 11], teacher_layers=12, student_layers=3)
    assert pairs.attention == ((0, 0), (1, 5), (2, 11))
    assert pairs.hidden == ((0, 0), (1, 1), (2, 6), (3, 12))


def test_explicit_short_mapping_matches_students_top_layers() -> None:
    pairs = layer_pairs([11], teacher_layers=12, student_layers=6)
    assert pairs.attention == ((5, 11),)
    assert pairs.hidden == ((6, 12),)
