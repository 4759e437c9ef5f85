"""WordNet for METEOR, offline: NLTK's own data if installed, else Debian's WordNet 3.0.

Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages ship the database in
/usr/share/wordnet. NLTK reads it only from ``<NLTK_DATA>/corpora/wordnet/`` and wants a
``lexnames`` file Debian leaves out, so the files are copied once into MEDTUNE_HOME with that
file written beside them (WordNet 3.0's 45 lexicographer files, in their published order).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEBIAN_WORDNET = Path("/usr/share/wordnet")
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
# The lexnames file's third column: WordNet's syntactic category numbers.
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_FILES = [
    *(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")),
    *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")),
    "index.sense",
]


def lexnames_text() -> str:
    return "".join(
        f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)
    )


def install_from(source: Path, nltk_data: Path) -> Path | None:
    """Copy WordNet from ``source`` into ``nltk_data/corpora/wordnet``; None if it is not there."""
    if not all((source / name).is_file() for name in _FILES):
        return None
    target = nltk_data / "corpora" / "wordnet"
    if (target / "lexnames").is_file():
        return target
    tmp = target.with_name("wordnet.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in _FILES:
        shutil.copyfile(source / name, tmp / name)
    (tmp / "lexnames").write_text(lexnames_text())
    tmp.rename(target)  # a reader never sees half the files
    return target


def ensure_wordnet(nltk_data: Path, source: Path = DEBIAN_WORDNET) -> bool:
    """Whether ``nltk.corpus.wordnet`` can be read, installing Debian's copy if need be."""
    try:
        import nltk
        from nltk.corpus import wordnet
    except ImportError:
        return False
    try:
        wordnet.synsets("test")
        return True
    except LookupError:
        pass
    try:
        installed = install_from(source, nltk_data)
    except OSError as exc:
        log.warning("could not copy WordNet from %s: %s", source, exc)
        return False
    if installed is None:
        return False
    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data))
    # The lazy loader that failed above tries again on its next use.
    try:
        wordnet.synsets("test")
        return True
    except LookupError:
        return False
