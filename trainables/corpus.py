"""Unlabelled text for task-agnostic distillation: a corpus cut into fixed-length token blocks.

Documents are tokenised, joined with the tokenizer's separator and cut into blocks of
`block_size` tokens (as Hugging Face's run_mlm does), so every batch is full and no padding is
spent. Blocks are cached on disk as Arrow files, which are memory-mapped: a corpus larger than
memory (Wikipedia + BookCorpus is about 3B tokens) trains without ever being loaded; only the
batches in use are paged in. Preparing the blocks reads the corpus once, in batches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from trainables.cache import cache_root, save_atomically

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
BLOCKS_FORMAT = 1


def load_corpus(
    dataset: str | None,
    dataset_config: str | None,
    split: str,
    files: list[Path],
    text_column: str,
) -> Dataset:
    """Raw documents from a hub dataset (`wikimedia/wikipedia`, `bookcorpus`) or local files."""
    if files:
        suffixes = {p.suffix.lower() for p in files}
        builders = {TEXT_SUFFIXES.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise ValueError(
                f"corpus.files: give files of one kind among {sorted(TEXT_SUFFIXES)}, got {sorted(suffixes)}"
            )
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise FileNotFoundError(f"corpus.files: no such file {missing[0]}")
        raw = load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")
    elif dataset:
        raw = load_dataset(dataset, dataset_config, split=split)
    else:
        raise ValueError("corpus: give a hub dataset name or local files")
    columns = raw.column_names
    if text_column not in columns:
        raise ValueError(f"corpus.text_column {text_column!r} is not a column; columns: {columns}")
    return raw


def _blocks(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, text_column: str, block_size: int):
    """Join a batch of documents into one token stream and cut it into full blocks."""
    texts = [t for t in batch[text_column] if t and t.strip()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    body = block_size - 2
    stream: list[int] = []
    for doc in ids:
        stream.extend(doc + [tokenizer.sep_token_id])
    cut = len(stream) - len(stream) % body
    blocks = [
        [tokenizer.cls_token_id, *stream[i : i + body], tokenizer.sep_token_id] for i in range(0, cut, body)
    ]
    return {
        "input_ids": blocks,
        "attention_mask": [[1] * block_size for _ in blocks],
        "token_type_ids": [[0] * block_size for _ in blocks],
    }


def block_splits(
    raw: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str,
    validation_fraction: float,
    cache_key_parts: dict[str, Any],
    cache_dir: Path | None = None,
    max_train_blocks: int | None = None,
) -> DatasetDict:
    """train / validation blocks with `example_id`, cached on disk by everything that shapes them."""
    key = hashlib.sha256(
        json.dumps(
            {**cache_key_parts, "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer), "block": block_size,
             "validation_fraction": validation_fraction, "max_train_blocks": max_train_blocks,
             "format": BLOCKS_FORMAT},
            sort_keys=True, default=str,
        ).encode()
    ).hexdigest()[:16]
    path = cache_root(cache_dir) / "blocks" / key
    if (path / "dataset_dict.json").exists():
        return DatasetDict.load_from_disk(str(path))
    blocks = raw.map(
        _blocks, batched=True, batch_size=256, remove_columns=raw.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "block_size": block_size},
        desc="cutting blocks",
    )
    if len(blocks) < 2:
        raise ValueError(f"corpus holds {len(blocks)} blocks of {block_size} tokens: too little text to train on")
    held_out = max(1, int(len(blocks) * validation_fraction))
    splits = blocks.train_test_split(test_size=held_out, shuffle=True, seed=0)
    train = splits["train"]
    if max_train_blocks is not None:
        train = train.select(range(min(max_train_blocks, len(train))))
    result = DatasetDict(
        train=train.add_column("example_id", list(range(len(train)))),
        validation=splits["test"].add_column("example_id", list(range(len(splits["test"])))),
    )
    save_atomically(result, path)
    return DatasetDict.load_from_disk(str(path))


def mlm_collator(tokenizer: PreTrainedTokenizerBase, mlm_probability: float) -> Any:
    """Masks `mlm_probability` of the tokens (80/10/10 as BERT); labels are -100 elsewhere.

    With probability 0 inputs stay unmasked and no MLM labels are made.
    """
    if mlm_probability <= 0:
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
