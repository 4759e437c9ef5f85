"""The job spec: the recipe's own config layout, validated, with the recipe's values as defaults.

A spec is what a user POSTs to ``/jobs``. It keeps the four sections of the recipe this project
grew from (``model_config``, ``lora_config``, ``training_dataset``, ``training_config``) verbatim,
so an existing config file is accepted unchanged. Unknown keys are rejected, never ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

RECIPE_SYSTEM_PROMPT = "Answer the question truthfully, you are a medical professional."
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Hub repo ids: "owner/name" with the characters the Hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Hub model ids: "name" (legacy) or "owner/name"; ".." is refused separately.
_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# An uploaded file (POST /files): its id, alone or after "file:".
FILE_REF = re.compile(r"^(?:file:)?(file-[A-Za-z0-9]{1,35})$")
# MedQuAD as published: a folder or a zip of XML documents.
ARCHIVE_SUFFIXES = (".zip", ".xml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    base_model: str = Field(
        default="unsloth/llama-3-8b-Instruct-bnb-4bit",
        min_length=1,
        max_length=300,
        description="Hub id or local folder of the base model; 'smollm2-135m-instruct' is the "
        "embedded default that works offline.",
    )
    finetuned_model: str = Field(
        default="llama-3-8b-Instruct-bnb-4bit-medical",
        description="Name of the tuned model (artifact and Hub repository name).",
    )
    max_seq_length: int = Field(default=2048, ge=16, le=131072, description="Tokens per example.")
    dtype: Literal["float16", "bfloat16"] | None = Field(
        default=None,
        description="Compute dtype; null picks bfloat16 where supported, else float16.",
    )
    load_in_4bit: bool = Field(default=True, description="Quantise the base to 4-bit NF4 (QLoRA).")

    @field_validator("base_model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("finetuned_model")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _SAFE_NAME.fullmatch(value):
            raise ValueError(
                "use 1-96 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value


class LoraSection(_Section):
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        min_length=1,
        description="Module names that get adapters; the recipe targets every attention and MLP "
        "projection.",
    )
    lora_alpha: float = Field(default=16, gt=0, le=4096, description="LoRA scaling numerator.")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on LoRA input.")
    bias: Literal["none", "all", "lora_only"] = "none"
    use_gradient_checkpointing: bool | Literal["unsloth"] = Field(
        default=True, description="true, false, or 'unsloth' for Unsloth's offloaded variant."
    )
    use_rslora: bool = False
    use_dora: bool = False
    loftq_config: dict[str, Any] | None = None


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
)


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
    max_samples: int | None = Field(
        default=None, ge=1, description="Read only the first N rows of this dataset."
    )
    format: Literal["auto", "medquad", "records"] = "auto"
    rename_columns: dict[str, str] = Field(default_factory=dict, max_length=100)
    remove_columns: list[str] = Field(default_factory=list, max_length=100)
    columns: ColumnMap | None = None

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

    weight: float = Field(
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
        "a local file (.jsonl/.json/.csv/.parquet) or folder, MedQuAD as published "
        "(a folder or .zip of its XML files), 'sample:medical_qa' for the shipped sample, or a "
        "Hugging Face Hub dataset id.",
    )
    split: str = Field(default="train", min_length=1, max_length=100)
    input_field: str = Field(
        default="prompt",
        min_length=1,
        max_length=100,
        description="Column holding ready prompt text, used when a row has no question/answer "
        "columns to render through the chat template.",
    )
    max_samples: int | None = Field(default=None, ge=1, description="Keep the first N rows.")
    system_prompt: str = Field(default=RECIPE_SYSTEM_PROMPT, max_length=4000)
    format: Literal["auto", "medquad", "records"] = Field(
        default="auto",
        description="auto: MedQuAD XML when the folder or zip holds .xml files, else records "
        "(JSON, JSONL, CSV, Parquet or Hub rows).",
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
    min_tokens: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Drop examples shorter than this (tokens)."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Drop examples longer than this (tokens) instead of truncating them.",
    )
    validation_share: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Share of examples held out for validation; leave 0 when the job has a "
        "validation_dataset.",
    )
    validation_seed: int = Field(
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
    max_truncated_share: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Fail before training when more than this share of examples is cut by "
        "max_seq_length.",
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
    mix_size: int | None = Field(
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
    mix_seed: int = Field(
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


class ValidationDataset(_SourceFields):
    """A separate validation set: read like one training source, then cleaned, rendered and
    tokenized with training_dataset's settings (system_prompt, dedupe, chat_template,
    train_on_prompt, min_tokens/max_tokens), and used as the validation split."""


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.lower().endswith(
        DATA_SUFFIXES + ARCHIVE_SUFFIXES
    )


def check_model_name(name: str) -> str:
    """A base model is a server folder (path-shaped) or a Hub model id ('owner/name', 'name').

    Anything else is refused here: ``from_pretrained`` reads a relative folder such as
    'jobs/../../x' from the worker's disk when it exists. Local folders (path-shaped names, and
    Hub-shaped names that exist on disk) are confined to the model roots in core.base_models.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("control characters are not allowed in a model name or path")
    if looks_like_path(name):
        return name
    if ".." in name or not _HUB_MODEL_ID.fullmatch(name):
        raise ValueError(
            f"{name!r} is neither a Hub model id like 'owner/name' nor a server folder (start a "
            "folder with '/', './' or '~'); 'smollm2-135m-instruct' is the embedded model"
        )
    return name


Optimizer = Literal[
    "adamw_8bit",
    "adamw_torch",
    "adamw_torch_fused",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
]
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]


class TrainingSection(_Section):
    per_device_train_batch_size: int = Field(default=2, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(default=4, ge=1, le=4096)
    warmup_steps: int = Field(default=5, ge=0, le=1_000_000)
    max_steps: int = Field(
        default=0, ge=-1, le=10_000_000, description="Steps to train; 0 or -1 trains for epochs."
    )
    num_train_epochs: float = Field(default=1, gt=0, le=1000)
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    fp16: bool | None = Field(default=None, description="null: on where bf16 is unsupported.")
    bf16: bool | None = Field(default=None, description="null: on where the GPU supports it.")
    logging_steps: int = Field(default=1, ge=1, le=100_000)
    optim: Optimizer = "adamw_8bit"
    weight_decay: float = Field(default=0.01, ge=0.0, le=10.0)
    lr_scheduler_type: Scheduler = "linear"
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    output_dir: str = Field(default="outputs", description="Folder name under the job's artifacts.")
    save_steps: int = Field(
        default=50,
        ge=0,
        le=10_000_000,
        description="Checkpoint every N steps (and at cancel); 0 saves only at cancel.",
    )
    save_total_limit: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept.")
    packing: bool = Field(
        default=False,
        description="Fill each micro-batch with up to per_device_train_batch_size x "
        "max_seq_length tokens of short examples, attention kept inside each example.",
    )
    packing_mode: Literal["padding_free", "length_grouped"] = Field(
        default="length_grouped",
        description="padding_free: examples concatenated in one row (needs a varlen attention "
        "kernel to be fast); length_grouped: similar lengths in a dense, right-padded batch.",
    )
    engine: Literal["auto", "unsloth", "transformers"] = Field(
        default="auto",
        description="auto: Unsloth on CUDA, transformers + peft elsewhere.",
    )
    eval_strategy: Literal["steps", "end", "no"] = Field(
        default="steps",
        description="When a job with a validation split (validation_dataset, or "
        "training_dataset.validation_share > 0) measures its eval loss on the held-out "
        "tokens: every eval_steps and at the end, only at the end, or never.",
    )
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Eval loss every N optimizer steps; null: ten times per run (every "
        "max(1, total_steps // 10) steps).",
    )

    @field_validator("output_dir")
    @classmethod
    def _relative_name(cls, value: str) -> str:
        if not _SAFE_NAME.fullmatch(value):
            raise ValueError("use a plain folder name (letters, digits, '.', '_', '-')")
        return value

    @model_validator(mode="after")
    def _one_half_precision(self) -> TrainingSection:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 cannot both be true; set one, or leave both null")
        return self


class EvaluationSection(_Section):
    enabled: bool = Field(
        default=False,
        description="After training, answer the held-out validation questions with the base "
        "model and the tuned adapter, and score both against the reference answers.",
    )
    max_examples: int = Field(default=32, ge=1, le=10_000)
    max_new_tokens: int = Field(default=128, ge=1, le=4096)


ExportFormat = Literal["lora", "merged_16bit", "merged_4bit", "gguf"]
GgufQuantization = Literal["f16", "q8_0", "q4_k_m"]


class ExportSection(_Section):
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["lora"],
        min_length=1,
        description="What to write after training; each is smoke-tested by loading it back "
        "(gguf: through llama.cpp, one file per gguf_quantizations entry).",
    )
    gguf_quantizations: list[GgufQuantization] = Field(
        default_factory=lambda: ["q4_k_m"],
        min_length=1,
        description="GGUF files written when formats has 'gguf': f16, q8_0, q4_k_m.",
    )
    push_to_hub: bool = Field(
        default=False,
        description="Push the exported artifacts to <hugging_face_username>/<finetuned_model> "
        "with the worker's HF_TOKEN; a failed push leaves the artifacts in place.",
    )


class JobSpec(_Section):
    """A fine-tuning job, in the recipe's layout."""

    model: ModelSection = Field(default_factory=ModelSection, alias="model_config")
    lora: LoraSection = Field(default_factory=LoraSection, alias="lora_config")
    dataset: DatasetSection = Field(default_factory=DatasetSection, alias="training_dataset")
    validation_dataset: ValidationDataset | None = Field(
        default=None,
        description="A separate validation set (name, split, input_field, max_samples, format, "
        "columns, rename_columns, remove_columns, as a training source takes), prepared like "
        "the training set and used for eval loss and the evaluation stage instead of a "
        "validation_share split. Examples that are also in the training set are dropped "
        "(dedupe permitting). null: the validation split, if any, comes from validation_share.",
    )
    training: TrainingSection = Field(default_factory=TrainingSection, alias="training_config")
    evaluation: EvaluationSection = Field(
        default_factory=EvaluationSection, alias="evaluation_config"
    )
    export: ExportSection = Field(default_factory=ExportSection, alias="export_config")
    hugging_face_username: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.-]{0,95}$")

    model_config = ConfigDict(extra="forbid", validate_by_alias=True, validate_by_name=False)

    @field_validator("validation_dataset")
    @classmethod
    def _one_validation_split(
        cls, value: ValidationDataset | None, info: ValidationInfo
    ) -> ValidationDataset | None:
        # Declared after `dataset`, so info.data holds it (absent if it failed validation).
        dataset = info.data.get("dataset")
        if value is not None and dataset is not None and dataset.validation_share > 0:
            raise ValueError(
                "validation_dataset and training_dataset.validation_share both give a "
                "validation split: set validation_share to 0 (or remove it) to validate on "
                "validation_dataset, or remove validation_dataset to hold out a share of the "
                "training data"
            )
        return value

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
