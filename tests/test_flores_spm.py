"""The FLORES-200 SentencePiece model rebuilt from a tokenizer.json (spBLEU offline)."""

from __future__ import annotations

import pytest

from fuselm.errors import FuselmError
from fuselm.eval import metrics as M
from fuselm.eval.flores_spm import build_from_tokenizer_json, rebuilt_model_path

spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a translation is faithful when it keeps the meaning",
    "the dogs jumped over the foxes, quickly and quietly",
    "meaning is kept; words are not",
] * 20


@pytest.fixture(scope="module")
def nllb_like_tokenizer(tmp_path_factory):
    """A tiny BPE tokenizer.json laid out like NLLB's: <s> <pad> </s> <unk> first, Metaspace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("nllb") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def test_rebuilt_model_splits_like_the_tokenizer_json(nllb_like_tokenizer):
    path, hf = nllb_like_tokenizer
    sp = spm.SentencePieceProcessor(model_proto=build_from_tokenizer_json(path))
    assert sp.get_piece_size() == hf.get_vocab_size() - 1  # no <pad>, as in NLLB's model
    texts = ["the quick dog", "faithful foxes jumped", "meaning kept", "quietly, the words", "unseen zebra"]
    unk = hf.token_to_id("<unk>")
    for text in texts:
        # SentencePiece ids are the tokenizer.json ids less one; unknown characters are <unk> in both
        ids = [unk if i == sp.unk_id() else i + 1 for i in sp.encode(text)]
        assert ids == hf.encode(text).ids, text
    assert len(sp.encode("the")) == 1 and len(sp.encode("zebra")) > 1


def test_not_a_bpe_tokenizer_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(FuselmError, match="expected a BPE tokenizer"):
        build_from_tokenizer_json(bad)
    with pytest.raises(FuselmError, match="not a readable"):
        build_from_tokenizer_json(tmp_path / "missing.json")


def test_spbleu_rebuilt_uses_the_rebuilt_model(nllb_like_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSELM_CACHE", str(tmp_path))
    refs = ["the quick brown fox jumps over the lazy dog"]
    spbleu_rebuilt = M.corpus_spbleu_rebuilt()
    assert spbleu_rebuilt(refs, refs) is None  # not built yet
    rebuilt_model_path().write_bytes(build_from_tokenizer_json(nllb_like_tokenizer[0]))
    assert spbleu_rebuilt(refs, refs) == pytest.approx(100.0)
    # scored on the model's pieces, not on words: ▁jump er and ▁dog g y share pieces with the reference
    hyp = ["the quick brown fox jumper over the lazy doggy"]
    import sacrebleu

    score = spbleu_rebuilt(hyp, refs)
    assert 0 < score < 100 and score != pytest.approx(sacrebleu.corpus_bleu(hyp, [refs]).score)
    assert spbleu_rebuilt([""], refs) == 0.0  # an empty output counts
