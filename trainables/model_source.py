"""Where a model reference points, without loading a model: a local folder, an MLflow URI, a hub id.

Apart from trainables.models so that the driver can read a model's config (for validation and the
cost estimate) without importing transformers' model code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MLFLOW_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


def resolve_model_source(ref: str) -> str:
    """A local directory for `from_pretrained`: MLflow URIs are downloaded, hub ids pass through."""
    if ref.startswith(MLFLOW_URI_PREFIXES):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        tokenizer = local / "components" / "tokenizer"
        if (local / "model" / "config.json").exists() and tokenizer.is_dir():
            # An MLflow transformers model keeps its tokenizer apart; `from_pretrained` wants both in one folder.
            for file in tokenizer.iterdir():
                if not (local / "model" / file.name).exists():
                    shutil.copy2(file, local / "model" / file.name)
            return str(local / "model")
        nested = [p.parent for p in local.rglob("config.json")]
        return str(nested[0] if nested else local)
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    if ref.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{ref!r}: no such model directory")
    return ref
