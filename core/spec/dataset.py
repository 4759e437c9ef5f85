"""The dataset part of the job spec: ``training_dataset`` (one source or a weighted mix of
sources, the columns, cleaning and rendering settings) and ``validation_dataset``."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from core.spec.base import Float, Int
from core.spec.base import Section as _Section

RECIPE_SYSTEM_PROMPT = "Answer the question truthfully, you are a medical professional."
# Hub repo ids: "owner/name" with the characters the Hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# An uploaded file (POST /files): its id, alone or after "file:".
FILE_REF = re.compile(r"^(?:file:)?(file-[A-Za-z0-9]{1,35})$")
# MedQuAD as published: a folder or a zip of XML documents.
ARCHIVE_SUFFIXES = (".zip", ".xml")


class ColumnMap(_Section):
    """Which columns of a table hold the conversation: question/answer (alias input/output),
    optionally a system column, or one column with a ready list of role/content messages."""

    question: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        validation_alias=AliasChoices("question", "input"),
        description="Column with the user's question (alias: input).",
    )
    answer: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        validation_alias=AliasChoices("answer", "output"),
        description="Column with the answer the model learns (alias: output).",
    )
    system: str | None = Field(
        default=None, min_length=1, max_length=200, description="Column with a per-row system text."
    )
    messages: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Column with a list of {role, content} messages; excludes question/answer.",
    )

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_layout(self) -> ColumnMap:
        if self.messages is not None:
            if self.question or self.answer or self.system:
                raise ValueError("map either 'messages' or question/answer columns, not both")
        elif not (self.question and self.answer):
            raise ValueError("map both 'question' and 'answer' (or 'input' and 'output')")
        return self


# The single-source fields that a mix gives on each of its sources instead.
SOURCE_FIELDS = (
    "name",
    "split",
    "input_field",
    "max_samples",
    "format",
    "rename_columns",
    "remove_columns",
    "columns",
    "revision",
)
# A Hub revision: a branch, a tag or a commit hash ("refs/pr/1" included).
REVISION = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_/-]){0,199}$"  # no ".."


class _SourceFields(_Section):
    """Where one dataset's rows come from and how its columns map: a mix source or the
    validation set, read like training_dataset's own fields."""

    name: str = Field(
        min_length=1,
        max_length=1000,
        description="What training_dataset.name takes: an uploaded file's id, a local file or "
        "folder, MedQuAD as published, 'sample:medical_qa', or a Hub dataset id.",
    )
    split: str = Field(
        default="train",
        min_length=1,
        max_length=100,
        description="The Hub split to read (e.g. 'validation' or 'test'); files have none.",
    )
    input_field: str = Field(default="prompt", min_length=1, max_length=100)
    max_samples: Int | None = Field(
        default=None, ge=1, description="Read only the first N rows of this dataset."
    )
    format: Literal["auto", "medquad", "records", "text"] = "auto"
    rename_columns: dict[str, str] = Field(default_factory=dict, max_length=100)
    remove_columns: list[str] = Field(default_factory=list, max_length=100)
    columns: ColumnMap | None = None
    revision: str | None = Field(
        default=None,
        pattern=REVISION,
        description="The Hub dataset's branch, tag or commit; null: its default branch.",
    )

    @field_validator("name")
    @classmethod
    def _dataset_name(cls, value: str) -> str:
        # The same names training_dataset.name accepts, checked by the same rules.
        try:
            DatasetSection(name=value)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return value


class DatasetSource(_SourceFields):
    """One dataset of a mix: where its rows come from, how its columns map, and its weight."""

    weight: Float = Field(
        default=1.0,
        gt=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="This source's share of the mixed training set is weight / (sum of all "
        "weights), e.g. 3 and 1 give 75% and 25%.",
    )


class DatasetSection(_Section):
    name: str = Field(
        default="Shekswess/medical_llama3_instruct_dataset_short",
        min_length=1,
        max_length=1000,
        description="An uploaded file's id ('file-...' or 'file:file-...', from POST /files), "
        "a local file (.jsonl/.json/.csv/.parquet; .txt for format 'text') or folder, MedQuAD "
        "as published "
        "(a folder or .zip of its XML files), 'sample:medical_qa' for the shipped sample, or a "
        "Hugging Face Hub dataset id.",
    )
    split: str = Field(default="train", min_length=1, max_length=100)
    revision: str | None = Field(
        default=None,
        pattern=REVISION,
        description="Pin a Hub dataset to a branch, tag or commit hash; null: its default branch "
        "(ignored for files).",
    )
    input_field: str = Field(
        default="prompt",
        min_length=1,
        max_length=100,
        description="Column holding ready prompt text, used when a row has no question/answer "
        "columns to render through the chat template.",
    )
    max_samples: Int | None = Field(default=None, ge=1, description="Keep the first N rows.")
    system_prompt: str = Field(default=RECIPE_SYSTEM_PROMPT, max_length=4000)
    system_prompt_source: Literal["row", "job"] = Field(
        default="row",
        description="row: a row's own system text wins where it has one (Alpaca: 'instruction' "
        "when 'input' is set; a 'system' column; a messages list's system turn) and "
        "system_prompt fills in elsewhere. job: system_prompt is every example's system turn, "
        "an Alpaca instruction joins the user turn. The dataset stats count which applied.",
    )
    format: Literal["auto", "medquad", "records", "text"] = Field(
        default="auto",
        description="auto: MedQuAD XML when the folder or zip holds .xml files, raw text for a "
        ".txt file, else records (JSON, JSONL, CSV, Parquet or Hub rows). text: continued "
        "pretraining on raw documents (the input_field column, else 'text'; each .txt file, "
        "also in a folder, is one document): no chat template, every token trained, EOS "
        "appended, a document longer than max_seq_length split into windows of it.",
    )
    rename_columns: dict[str, str] = Field(
        default_factory=dict,
        max_length=100,
        description="Rename columns before mapping, old -> new (the recipe's rename step).",
    )
    remove_columns: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Drop these columns before mapping (the recipe's remove_columns step).",
    )
    columns: ColumnMap | None = Field(
        default=None,
        description="Explicit column mapping; null detects Alpaca, question/answer, messages "
        "or input_field text.",
    )
    dedupe: Literal["none", "exact", "normalized"] = Field(
        default="normalized",
        description="Drop duplicate conversations: exact text, or after case, punctuation and "
        "whitespace are normalised.",
    )
    drop_looping_answers: bool = Field(
        default=True,
        description="Drop examples whose answer says one 8-word phrase 3 or more times: a "
        "model trained on answers that loop learns to loop (counted as answer_loops).",
    )
    min_tokens: Int | None = Field(
        default=None, ge=1, le=1_000_000, description="Drop examples shorter than this (tokens)."
    )
    max_tokens: Int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Drop examples longer than this (tokens) instead of truncating them.",
    )
    validation_share: Float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Share of examples held out for validation; leave 0 when the job has a "
        "validation_dataset.",
    )
    validation_seed: Int = Field(
        default=42, ge=0, le=2**32 - 1, description="Seed of the validation split (stable)."
    )
    chat_template: Literal["auto", "llama3", "mistral_v2", "gemma", "llama2", "chatml"] = Field(
        default="auto",
        description="auto: the tokenizer's own chat template, ChatML when it has none; or a "
        "built-in template written from the model family's reference format.",
    )
    train_on_prompt: bool = Field(
        default=False,
        description="Train on the whole text; false trains on the answers only (end-of-turn "
        "token included).",
    )
    max_truncated_share: Float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Fail before training when more than this share of examples is cut by "
        "max_seq_length.",
    )
    on_bad_rows: Literal["fail", "skip"] = Field(
        default="skip",
        description="A row that cannot be read (a JSONL line that is not a JSON object, a CSV "
        "row with more or fewer cells than its header, a MedQuAD file that is not a MedQuAD "
        "document): skip: drop and count it in the dataset stats (dropped, by reason), failing "
        "only above max_bad_row_share or when nothing is readable; fail: fail the job at the "
        "first one.",
    )
    max_bad_row_share: Float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="With on_bad_rows 'skip', the largest share of a dataset's rows (MedQuAD: "
        "files) that may be unreadable; above it the job fails (code dataset_bad_rows).",
    )
    min_examples: Int = Field(
        default=16,
        ge=1,
        le=10_000_000,
        description="Fail before the model is loaded (code dataset_too_small) when fewer "
        "training examples than this are left after cleaning, filters and the validation split.",
    )

    sources: list[DatasetSource] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="Mix several datasets (Axolotl's `datasets`, LLaMA-Factory's `dataset` "
        "list): each source has its own name, split, format, columns, rename_columns, "
        "remove_columns, max_samples and a weight, and the single-source fields above stay "
        "unset. Each source is loaded and cleaned on its own (duplicates across sources count "
        "against the later source), then a seeded draw takes weight / sum(weights) of the mix "
        "from it, WITHOUT replacement: no example is taken twice. A source with fewer cleaned "
        "examples than its share fails the job (code dataset_mix_too_small) unless "
        "mix_oversample is true. null: one source, given by name.",
    )
    mix_size: Int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Examples in the mixed training set (before the token-length filters and "
        "the validation split). null: the largest mix that keeps the weights without repeating "
        "an example, so the source that is smallest for its weight is taken whole.",
    )
    mix_oversample: bool = Field(
        default=False,
        description="When a source has fewer cleaned examples than its share of mix_size, "
        "repeat it (every example once per whole pass, then a seeded draw without replacement "
        "for the remainder) instead of failing.",
    )
    mix_seed: Int = Field(
        default=42, ge=0, le=2**32 - 1, description="Seed of the draw and order of a mix."
    )

    @property
    def kind(self) -> Literal["sample", "file", "path", "hub"]:
        if self.name.startswith("sample:"):
            return "sample"
        if self.name.startswith("file:") or FILE_REF.fullmatch(self.name):
            return "file"
        if looks_like_path(self.name):
            return "path"
        return "hub"

    @field_validator("name")
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        # A NUL reaches the file system as "embedded null byte", a 500 instead of this 422.
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("control characters are not allowed in a dataset name or path")
        return value

    @model_validator(mode="after")
    def _known_kind(self) -> DatasetSection:
        if self.kind == "file" and not FILE_REF.fullmatch(self.name):
            raise ValueError(
                f"name {self.name!r} is not an uploaded file's id: give 'file:<id>' or the bare "
                "'file-...' id that POST /files returned"
            )
        if self.kind == "hub" and not _HUB_ID.fullmatch(self.name):
            raise ValueError(
                f"name {self.name!r} is neither a file path (.jsonl, .json, .csv, .parquet or a "
                "folder) nor a Hub dataset id like 'owner/name'"
            )
        if self.min_tokens and self.max_tokens and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self

    @model_validator(mode="after")
    def _sources_or_one_source(self) -> DatasetSection:
        if self.sources is None:
            if self.mix_size is not None or self.mix_oversample:
                raise ValueError("mix_size and mix_oversample apply only with sources")
            return self
        # Compared with the defaults, not with the keys sent: a stored spec lists every field.
        given = [
            name
            for name in SOURCE_FIELDS
            if getattr(self, name)
            != type(self).model_fields[name].get_default(call_default_factory=True)
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be set beside sources: give "
                f"{', '.join(given)} on each source instead"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unused_source_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A mix reads its sources: the single-source fields are unused defaults, and shown they
        # would name the recipe's Hub dataset as if it had been trained on.
        data = handler(self)
        if self.sources is not None and isinstance(data, dict):
            for name in SOURCE_FIELDS:
                data.pop(name, None)
        return data


class ValidationDataset(_SourceFields):
    """A separate validation set: read like one training source, then cleaned, rendered and
    tokenized with training_dataset's settings (system_prompt, dedupe, drop_looping_answers,
    chat_template, train_on_prompt, min_tokens/max_tokens), and used as the validation split."""


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.lower().endswith(
        DATA_SUFFIXES + ARCHIVE_SUFFIXES
    )
