"""llmforge tokenizers as Hugging Face fast tokenizers (`tokenizer.json` + `tokenizer_config.json`), so that
`AutoTokenizer.from_pretrained(DIR)` encodes and decodes ordinary text exactly as llmforge does.

- char: a WordLevel vocabulary over single characters (one pre-token per code point), pieces fused on decode.
  (llmforge decodes <eos> as a newline; Hugging Face skips it as a special token.)
- sentencepiece BPE: the same pieces and ids, merges derived from the piece order (the order sentencepiece merges
  in), byte fallback, whitespace as "▁" (Metaspace), user-defined symbols as added tokens, control pieces special.
- hf: the tokenizer it was loaded from.
- added (a base plus chat role markers): the base's form with the markers as special tokens after its vocabulary.
"""

from __future__ import annotations

import os
from typing import Any

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTok

from llmforge.tokenizer.base import Tokenizer
from llmforge.tokenizer.char import SPECIALS

# sentencepiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def to_hf_tokenizer(tok: Any) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, special tokens by role) for any llmforge tokenizer."""
    kind = tok.to_json()["type"]
    if kind == "char":
        return _char(tok)
    if kind == "sentencepiece":
        return _sentencepiece(tok)
    if kind == "added":
        backend, roles = to_hf_tokenizer(tok.base)
        if backend.get_vocab_size(with_added_tokens=True) != tok.base_size:
            raise ValueError("the base tokenizer's Hugging Face vocabulary does not end where llmforge's does")
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tok.tokens])
        return backend, {**roles, "additional_special_tokens": list(tok.tokens)}
    if kind == "hf":
        data = tok.to_json()
        roles = {"eos_token": data.get("eos_token"), "pad_token": data.get("pad_token")}
        return HFTok.from_str(data["tokenizer_json"]), {k: v for k, v in roles.items() if v}
    raise ValueError(f"no Hugging Face form for tokenizer type {kind!r}")


def save_hf_tokenizer(tok: Tokenizer, out: str) -> str:
    """Write the tokenizer where `AutoTokenizer.from_pretrained(out)` finds it."""
    from transformers import PreTrainedTokenizerFast

    backend, roles = to_hf_tokenizer(tok)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **roles)
    os.makedirs(out, exist_ok=True)
    fast.save_pretrained(out)
    return out


def _char(tok: Any) -> tuple[Any, dict[str, str]]:
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: i + len(SPECIALS) for i, c in enumerate(tok.chars)})
    backend = HFTok(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per code point
    # llmforge decodes an unknown character as U+FFFD: <unk> stays an ordinary token so decoding keeps it
    backend.decoder = decoders.Sequence([decoders.Replace("<unk>", "\ufffd"), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS if s != "<unk>"])
    return backend, {"pad_token": "<pad>", "eos_token": "<eos>"}


def _sentencepiece(tok: Any) -> tuple[Any, dict[str, str]]:
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf module
    proto.ParseFromString(tok._proto)
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise ValueError("only sentencepiece BPE models are exported (this one is not BPE)")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = pieces[proto.trainer_spec.unk_id].piece
    backend = HFTok(
        models.BPE(
            vocab=vocab,
            merges=generate_merges(vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    dummy = proto.normalizer_spec.add_dummy_prefix
    # sentencepiece puts the dummy "▁" before the whole text only; Metaspace "first" does the same except before a
    # leading added token or a leading space. llmforge trains without a dummy prefix, so its models map exactly.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if dummy else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_tokens(
        [AddedToken(p.piece, normalized=False, special=False) for p in pieces if p.type == _USER_DEFINED]
    )
    backend.add_special_tokens(
        [AddedToken(p.piece, normalized=False, special=True) for p in pieces if p.type in (_UNKNOWN, _CONTROL)]
    )
    roles = {"unk_token": unk}
    for role, idx in (
        ("bos_token", proto.trainer_spec.bos_id),
        ("eos_token", proto.trainer_spec.eos_id),
        ("pad_token", proto.trainer_spec.pad_id),
    ):
        if idx >= 0:
            roles[role] = pieces[idx].piece
    return backend, roles
