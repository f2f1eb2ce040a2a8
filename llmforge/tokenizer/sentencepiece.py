"""SentencePiece BPE: trained on a sample of the cleaned corpus, with byte fallback and pad/unk/bos/eos ids."""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterable

import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class SentencePieceTokenizer:
    def __init__(self, model_proto: bytes):
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.eos_id, self.bos_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id()

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, path: str, byte_fallback: bool = True
    ) -> SentencePieceTokenizer:
        """Train BPE on `texts` (one document per item) and save the model to `path`."""
        with tempfile.TemporaryDirectory() as tmp:
            sample = os.path.join(tmp, "sample.txt")
            with open(sample, "w", encoding="utf-8") as f:
                for text in texts:
                    for line in text.split("\n"):
                        if line.strip():
                            f.write(line + "\n")
            prefix = os.path.join(tmp, "spm")
            spm.SentencePieceTrainer.train(
                input=sample,
                model_prefix=prefix,
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=byte_fallback,
                pad_id=PAD,
                unk_id=UNK,
                bos_id=BOS,
                eos_id=EOS,
                user_defined_symbols=["\n", "\t"],
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                character_coverage=0.9995,
                max_sentence_length=1 << 16,
                num_threads=os.cpu_count() or 1,
                add_dummy_prefix=False,
                minloglevel=2,
                hard_vocab_limit=False,
            )
            with open(prefix + ".model", "rb") as f:
                proto = f.read()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(proto)
        os.replace(path + ".tmp", path)
        return cls(proto)

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        with open(path, "rb") as f:
            return cls(f.read())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)  # parallelism comes from prepare's worker processes

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.pad_id, self.eos_id, self.bos_id)])

    def to_json(self) -> dict:
        return {"type": "sentencepiece", "model": base64.b64encode(self._proto).decode("ascii")}

    @classmethod
    def from_json(cls, data: dict) -> SentencePieceTokenizer:
        return cls(base64.b64decode(data["model"]))
