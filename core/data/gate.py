"""The gate: checks on every rendered, tokenized example before a GPU minute is spent.

Failures that silently ruin a fine-tune and that no loss curve shows:
- BOS missing or doubled (a template that writes ``<s>`` while the tokenizer adds one too, or
  text that carries the BOS string): the model sees inputs it was never pretrained on.
- An answer's end-of-turn token missing or masked: the model never learns to stop.
- No trained token at all: every label masked, the loss is zero or NaN.
- Most examples cut by max_seq_length: answers lose their end, the model learns to ramble.

Each failure is a ``DatasetGateError`` with a stable code and the index of the first example at
fault; ``inspect`` returns every finding instead, for previews.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.data.example import Example
from core.data.tokenize import IGNORE_INDEX, Encoded, render
from core.errors import DatasetError

FIELD = "training_dataset"
_PROBE_ANSWER = "Probe answer 7"


class DatasetGateError(DatasetError):
    """The dataset failed a check before training; ``example_index`` names the first bad one."""

    code = "dataset_gate"

    def __init__(
        self, detail: str, *, code: str, example_index: int | None = None, field: str = FIELD
    ) -> None:
        super().__init__(detail, field=field, code=code)
        self.example_index = example_index
        # Set by prepare: the statistics of the refused dataset, stored on the failed job.
        self.dataset_stats: dict[str, Any] | None = None


@dataclass(frozen=True)
class Finding:
    code: str
    detail: str
    example_index: int | None = None
    field: str = FIELD

    def error(self) -> DatasetGateError:
        return DatasetGateError(
            self.detail, code=self.code, example_index=self.example_index, field=self.field
        )


@dataclass(frozen=True)
class TokenRules:
    """What a well-formed example looks like for one tokenizer and template."""

    bos_id: int | None  # None: this tokenizer/template uses no sequence BOS to check
    bos_per_user_turn: bool  # Llama 2 opens every [INST] with its own BOS
    eot_id: int | None  # the token that closes an answer
    eot_token: str | None


def token_rules(tokenizer: Any) -> TokenRules:
    """Learn the BOS and end-of-turn conventions by rendering a probe conversation."""
    probe = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ]
    bos = tokenizer.bos_token_id
    bos_id, per_turn = None, False
    if bos is not None:
        ids = tokenizer(render(tokenizer, probe), add_special_tokens=False)["input_ids"]
        count = ids.count(bos)
        if count == 1:
            bos_id = bos
        elif count == 2:
            bos_id, per_turn = bos, True
        elif count == 0 and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
            bos_id = bos  # the model expects a BOS the template never writes: every example fails
        # more than one per user turn: the "BOS" is a turn marker (ChatML's <|im_start|>)
    eot_id = _end_of_turn(tokenizer, probe)
    eot_token = tokenizer.convert_ids_to_tokens(eot_id) if eot_id is not None else None
    return TokenRules(bos_id=bos_id, bos_per_user_turn=per_turn, eot_id=eot_id, eot_token=eot_token)


def _end_of_turn(tokenizer: Any, probe: list[dict[str, str]]) -> int | None:
    text = render(tokenizer, probe)
    at = text.rfind(_PROBE_ANSWER)
    if at >= 0:
        tail = tokenizer(text[at + len(_PROBE_ANSWER) :], add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", 0)
        }
        for token in tail:
            if token in special:
                return int(token)
    return tokenizer.eos_token_id


def _where(index: int, example: Example | None) -> str:
    meta = example.meta if example is not None else {}
    parts = [f"example {index}"]
    if "dataset_index" in meta:
        parts.append(f"source {meta['dataset_index']} {meta.get('dataset')!r}")
    if "row" in meta:
        parts.append(f"row {meta['row']}")
    if meta.get("document"):
        parts.append(str(meta["document"]))
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def check_example(
    index: int, item: Encoded, example: Example | None, rules: TokenRules
) -> Finding | None:
    """The first problem of one example, on its uncut tokens, or None."""
    ids = item.full_ids or item.input_ids
    labels = item.full_labels or item.labels
    where = _where(index, example)
    raw = example is not None and example.raw
    if raw and example is not None and example.meta.get("window", 0) > 0:
        return None  # a later window of a long document: mid-text, no BOS, no end yet
    if rules.bos_id is not None:
        expected = 1
        if rules.bos_per_user_turn and example is not None and example.messages is not None:
            expected = sum(m["role"] == "user" for m in example.messages)
        count = ids.count(rules.bos_id)
        if count == 0 or ids[0] != rules.bos_id:
            return Finding(
                "bos_missing",
                f"{where} does not start with the BOS token; the chat template writes none and "
                "the model was pretrained with one: pick a chat_template that writes it",
                index,
            )
        if count > expected:
            return Finding(
                "bos_repeated",
                f"{where} has {count} BOS tokens, expected {expected}: the text carries the BOS "
                "string, or it was added twice",
                index,
            )
    if raw:
        return None  # continued pretraining: the encoder appends EOS; no turns to close
    if rules.eot_id is None:
        return Finding(
            "eot_missing",
            f"{where}: the tokenizer has no end-of-turn or EOS token, so the model cannot learn "
            "to stop; pick a chat_template",
            index,
            "training_dataset.chat_template",
        )
    for turn, (start, end) in enumerate(item.answer_spans):
        if rules.eot_id in ids[start:end]:
            continue
        if end < len(ids) and ids[end] == rules.eot_id and labels[end] == IGNORE_INDEX:
            return Finding(
                "eot_not_trained",
                f"{where}: answer {turn} ends with {rules.eot_token} outside the trained span "
                "(label masked), so the model never learns to stop; the chat template closes "
                "the turn after the answer",
                index,
                "training_dataset.chat_template",
            )
        return Finding(
            "eot_missing",
            f"{where}: answer {turn} is not closed by {rules.eot_token}; the chat template "
            "does not end assistant turns with it",
            index,
            "training_dataset.chat_template",
        )
    return None


def inspect(
    items: list[Encoded],
    examples: list[Example] | None,
    rules: TokenRules,
    *,
    max_truncated_share: float,
    max_seq_length: int,
    first_only: bool = False,
) -> list[Finding]:
    """Every finding: per-example problems in order, then the dataset-wide ones."""
    findings = []
    for index, item in enumerate(items):
        found = check_example(index, item, examples[index] if examples else None, rules)
        if found:
            findings.append(found)
            if first_only:
                return findings
    trained = sum(1 for i in items for label in i.labels if label != IGNORE_INDEX)
    if items and trained == 0:
        findings.append(
            Finding(
                "no_trained_tokens",
                "no token of any example is trained (every label is masked); check that rows "
                "have answers and that max_seq_length leaves room for them",
            )
        )
    truncated = [i for i, item in enumerate(items) if item.truncated]
    if items and len(truncated) / len(items) > max_truncated_share:
        first = truncated[0]
        findings.append(
            Finding(
                "too_many_truncated",
                f"{len(truncated)} of {len(items)} examples ({len(truncated) / len(items):.1%}) "
                f"are longer than max_seq_length {max_seq_length}, above max_truncated_share "
                f"{max_truncated_share:.1%}; the first is "
                f"{_where(first, examples[first] if examples else None)} with "
                f"{items[first].length} tokens. Raise model_config.max_seq_length, set "
                "training_dataset.max_tokens to drop long examples, or raise max_truncated_share",
                first,
                "model_config.max_seq_length",
            )
        )
    return findings


def enforce(
    items: list[Encoded],
    examples: list[Example] | None,
    rules: TokenRules,
    *,
    max_truncated_share: float,
    max_seq_length: int,
) -> None:
    """Raise the first finding as a DatasetGateError."""
    findings = inspect(
        items,
        examples,
        rules,
        max_truncated_share=max_truncated_share,
        max_seq_length=max_seq_length,
        first_only=True,
    )
    if findings:
        raise findings[0].error()
