"""Raw text for continued pretraining (``format: "text"``, and .txt files).

Each row's text is one document: no chat template, no prompt masking, every token trained and
the tokenizer's EOS appended (core.data.tokenize encodes text examples so). A document longer
than max_seq_length is split into consecutive windows of max_seq_length tokens, each trained
whole, instead of being cut: a corpus of long articles loses nothing, and the truncation gate
has nothing to refuse.
"""

from __future__ import annotations

from dataclasses import replace

from core.data.cleaning import clean_text
from core.data.conversations import META_KEYS, Conversion
from core.data.example import Example
from core.data.sources import Row
from core.data.tokenize import Encoded
from core.errors import DatasetError

TEXT_COLUMN = "text"


def text_column(row: Row, input_field: str) -> str:
    """The column a text row's document is in: ``input_field`` when the rows have it, else
    ``text`` (so the recipe's default input_field, 'prompt', needs no change)."""
    for column in (input_field, TEXT_COLUMN):
        if column in row:
            return column
    raise DatasetError(
        f"training_dataset.format is 'text' and the rows have no {input_field!r} or 'text' "
        f"column (they have {sorted(row)[:12]}): name the text column in "
        "training_dataset.input_field",
        field="training_dataset.input_field",
        code="dataset_columns",
    )


def text_examples(rows: list[Row], *, input_field: str) -> Conversion:
    """One raw-text example per row; empty texts are dropped and counted (``empty_text``)."""
    column = text_column(rows[0], input_field)
    conv = Conversion(examples=[], layout="text")
    for index, row in enumerate(rows):
        text = clean_text(row.get(column))
        if not text:
            conv.dropped["empty_text"] += 1
            continue
        meta = {"row": index, **{k: row[k] for k in META_KEYS if row.get(k)}}
        conv.examples.append(Example(text=text, meta=meta, raw=True))
        conv.system_from["none"] += 1
    if not conv.examples:
        raise DatasetError(
            f"every row's {column!r} is empty ({dict(conv.dropped)})",
            field="training_dataset",
            code="dataset_empty",
        )
    return conv


def split_windows(
    examples: list[Example], items: list[Encoded], *, max_length: int
) -> tuple[list[Example], list[Encoded]]:
    """Raw-text documents longer than ``max_length`` tokens as consecutive windows of it (the
    last one shorter, ending in EOS); other examples as they are. Lists stay parallel."""
    out_examples: list[Example] = []
    out_items: list[Encoded] = []
    for example, item in zip(examples, items, strict=True):
        if not (example.raw and item.truncated):
            out_examples.append(example)
            out_items.append(item)
            continue
        ids = item.full_ids
        for number, start in enumerate(range(0, len(ids), max_length)):
            window = ids[start : start + max_length]
            meta = {**item.meta, "window": number}
            # The document's text, shared: the validation split ranks by it, so a document's
            # windows stay on one side of the split (no held-out window beside a trained one).
            out_examples.append(replace(example, meta=meta))
            out_items.append(
                Encoded(
                    window,
                    list(window),
                    truncated=False,
                    length=len(window),
                    answer_spans=[(0, len(window))],
                    full_ids=window,
                    full_labels=list(window),
                    meta=meta,
                )
            )
    return out_examples, out_items
