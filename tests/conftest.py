"""Shared fixtures: tiny real transformers models built from configs, offline hub settings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification  # noqa: E402

torch.set_num_threads(1)


def tiny_bert_config(layers: int = 4, hidden: int = 32, heads: int = 4, labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=120,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        num_labels=labels,
    )


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=70, num_labels=3, pad_token_id=1,
    )
    return RobertaForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache folder shared by the session: tokenised demo data and tiny teachers."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_demo_teacher(demo_cache) -> str:
    """A 4-layer, 64-wide BERT trained from scratch on the demo tweets by `finetune_teacher`.

    Uses the real MiniLM tokenizer; reaches about 0.78 validation accuracy in seconds.
    """
    from transformers import AutoTokenizer

    from trainables.config import TrainingConfig
    from trainables.demo import demo_teacher_base
    from trainables.teacher import TeacherRequest, finetune_teacher

    torch.manual_seed(0)
    base = demo_cache / "tiny-base"
    config = tiny_bert_config(layers=4, hidden=64, heads=4)
    config.vocab_size, config.max_position_embeddings = 30522, 128
    BertForSequenceClassification(config).save_pretrained(base)
    AutoTokenizer.from_pretrained(demo_teacher_base()).save_pretrained(base)
    request = TeacherRequest(
        base_model=str(base),
        task="demo",
        output_root=demo_cache / "teachers",
        cache_dir=demo_cache,
        training=TrainingConfig(
            learning_rate=1e-3, num_train_epochs=4, per_device_train_batch_size=32, max_seq_length=48,
            eval_steps=50, warmup_ratio=0.1,
        ),
    )
    path, _ = finetune_teacher(request)
    return str(path)
