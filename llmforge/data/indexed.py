"""Token shards in Megatron's indexed-dataset format (`.bin` tokens + `.idx` index, "MMIDIDX" version 1).

The `.idx` holds: header, version, dtype code, sequence count, document count, then int32 sequence lengths,
int64 byte pointers into the `.bin`, and int64 document boundaries. megatron-core's `IndexedDataset` reads these files.
Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDatasetWriter:
    """Append documents (token id arrays) and finalize into <prefix>.bin and <prefix>.idx."""

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin_tmp = prefix + ".bin.tmp"
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 (open across add_document calls; finalize closes it)
        self.lengths: list[int] = []

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.lengths.append(len(arr))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        idx_tmp = self.prefix + ".idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")


HEADER_BYTES = len(HEADER) + 8 + 1 + 8 + 8


def read_index_header(path: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequences, documents) from an `.idx` header, checked against the file's size: a ValueError with one
    line saying what is wrong (magic, version, dtype code, or counts that do not add up to the size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: not an indexed-dataset index (no MMIDIDX header)")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", head, len(HEADER))
    if version != 1:
        raise ValueError(f"{path}: index version {version}, expected 1")
    if code not in DTYPE_CODES:
        raise ValueError(f"{path}: unknown dtype code {code} in the index header")
    if HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8 != size:
        raise ValueError(f"{path}: the header's {n_seq} sequences / {n_doc} documents do not match its {size} bytes")
    return np.dtype(DTYPE_CODES[code]), n_seq, n_doc


class IndexedDataset:
    """Read-only, memory-mapped view of <prefix>.bin/.idx."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.dtype, n_seq, n_doc = read_index_header(prefix + ".idx")
        offset = HEADER_BYTES
        idx = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=offset)
        offset += self.lengths.nbytes
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=offset)
        offset += self.pointers.nbytes
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=n_doc, offset=offset)
        size = os.path.getsize(prefix + ".bin")
        self.tokens = np.memmap(prefix + ".bin", mode="r", dtype=self.dtype) if size else np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.lengths[i])])
