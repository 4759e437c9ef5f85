"""The job spec: the recipe's own config layout, validated, with the recipe's values as defaults.

A spec is what a user POSTs to ``/jobs``. It keeps the four sections of the recipe this project
grew from (``model_config``, ``lora_config``, ``training_dataset``, ``training_config``) verbatim,
so an existing config file is accepted unchanged. Unknown keys are rejected, never ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.spec.base import Float, Int
from core.spec.base import Section as _Section
from core.spec.dataset import (
    REVISION,
    DatasetSection,
    ValidationDataset,
    looks_like_path,
)
from core.spec.evaluation import EvaluationSection
from core.spec.lora_embeddings import EmbeddingFields
from core.spec.preference import PreferenceFields, check_method

MAX_TARGET_MODULES = 64
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Hub model ids: "name" (legacy) or "owner/name"; ".." is refused separately.
_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


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
        description="Name of the tuned model (artifact and Hub repository name). Left out or "
        "null: the base model's last name part plus '-medical' (smollm2-135m-instruct-medical).",
    )
    revision: str | None = Field(
        default=None,
        pattern=REVISION,
        description="Pin a Hub base model to a branch, tag or commit hash; null: its default "
        "branch (ignored for local folders and the embedded model).",
    )
    max_seq_length: Int = Field(default=2048, ge=16, le=131072, description="Tokens per example.")
    dtype: Literal["float16", "bfloat16"] | None = Field(
        default=None,
        description="Compute dtype: 'float16' or 'bfloat16' (also written as the recipe's "
        "'torch.float16' / 'torch.bfloat16'); null picks bfloat16 where supported, else float16.",
    )
    load_in_4bit: bool = Field(default=True, description="Quantise the base to 4-bit NF4 (QLoRA).")
    init_adapter: str | None = Field(
        default=None,
        pattern=r"^job_[0-9a-f]{24}$",
        description="Continue from another job: the id of a succeeded job of yours on the same "
        "base model, whose LoRA adapter is the starting point instead of a fresh one "
        "(lora_config must match its r, lora_alpha, target_modules, bias, use_rslora, "
        "use_dora). null: a fresh adapter.",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_after_the_base(cls, data: Any) -> Any:
        # A fixed default named a Llama model whatever was tuned; derive it from the base.
        if isinstance(data, dict) and data.get("finetuned_model") is None:
            base = data.get("base_model", cls.model_fields["base_model"].default)
            if isinstance(base, str):
                return {**data, "finetuned_model": tuned_name(base)}
        return data

    @field_validator("base_model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("dtype", mode="before")
    @classmethod
    def _torch_dtype_name(cls, value: Any) -> Any:
        # The recipe's Python value (torch.float16) arrives in JSON as the string of its name.
        if isinstance(value, str) and value.startswith("torch."):
            return value.removeprefix("torch.")
        return value

    @field_validator("finetuned_model")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _SAFE_NAME.fullmatch(value):
            raise ValueError(
                "use 1-96 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value


class LoftQSection(_Section):
    loftq_bits: Literal[4, 8] = 4  # NF4 or int8, what peft's LoftQ quantises to
    loftq_iter: Int = Field(default=1, ge=1, le=20, description="Alternating LoftQ steps.")


class LoraSection(EmbeddingFields):
    r: Int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        min_length=1,
        description="Module names that get adapters (repeats dropped, at most "
        f"{MAX_TARGET_MODULES}); the recipe targets every attention and MLP projection. Checked "
        "against the base model's modules at submit when its config is on the server.",
    )
    lora_alpha: Float = Field(default=16, gt=0, le=4096, description="LoRA scaling numerator.")
    lora_dropout: Float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on LoRA input.")
    bias: Literal["none", "all", "lora_only"] = "none"
    use_gradient_checkpointing: bool | Literal["unsloth"] = Field(
        default=True, description="true, false, or 'unsloth' for Unsloth's offloaded variant."
    )
    use_rslora: bool = False
    use_dora: bool = False
    loftq_config: LoftQSection | None = Field(
        default=None,
        description="LoftQ initialisation (peft): the base is quantised with the LoRA factors "
        "fitted to what quantisation loses. It quantises a full-precision base itself, so it "
        "needs model_config.load_in_4bit false, and a CUDA worker (peft quantises with "
        "bitsandbytes on the GPU). null: LoRA starts at zero, as the recipe does.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _distinct_and_few(cls, value: Any) -> Any:
        # Stored as given, a list of 100,000 names would sit in every job row and response.
        if isinstance(value, list):
            value = list(dict.fromkeys(value)) if all(isinstance(v, str) for v in value) else value
            if len(value) > MAX_TARGET_MODULES:
                raise ValueError(
                    f"{len(value)} distinct module names; give at most {MAX_TARGET_MODULES} "
                    "(or 'all-linear')"
                )
        return value


def tuned_name(base_model: str) -> str:
    """``<base's last name part>-medical``, cut to a valid name: the recipe's base
    ``unsloth/llama-3-8b-Instruct-bnb-4bit`` keeps the recipe's own name for it."""
    last = base_model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", last).lstrip("._-")[:88] or "model"
    return f"{stem}-medical"


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


class EarlyStoppingSection(_Section):
    patience: Int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Evaluations in a row without an improvement of the eval loss before "
        "training stops.",
    )
    min_delta: Float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="An eval loss counts as an improvement only when lower than the best so "
        "far by more than this.",
    )


class TrainingSection(PreferenceFields):
    per_device_train_batch_size: Int = Field(default=2, ge=1, le=1024)
    gradient_accumulation_steps: Int = Field(default=4, ge=1, le=4096)
    warmup_steps: Int = Field(default=5, ge=0, le=1_000_000)
    max_steps: Int = Field(
        default=0, ge=-1, le=10_000_000, description="Steps to train; 0 or -1 trains for epochs."
    )
    num_train_epochs: Float = Field(
        default=1,
        ge=0,
        le=1000,
        description="Passes over the data; 0 is allowed when max_steps > 0 says how long to train.",
    )
    learning_rate: Float = Field(default=2e-4, gt=0, le=1.0)
    fp16: bool | None = Field(default=None, description="null: on where bf16 is unsupported.")
    bf16: bool | None = Field(default=None, description="null: on where the GPU supports it.")
    logging_steps: Int = Field(default=1, ge=1, le=100_000)
    optim: Optimizer = "adamw_8bit"
    weight_decay: Float = Field(default=0.01, ge=0.0, le=10.0)
    lr_scheduler_type: Scheduler = "linear"
    seed: Int = Field(default=42, ge=0, le=2**32 - 1)
    output_dir: str = Field(default="outputs", description="Folder name under the job's artifacts.")
    save_steps: Int = Field(
        default=50,
        ge=0,
        le=10_000_000,
        description="Checkpoint every N steps (and at cancel); 0 saves only at cancel.",
    )
    save_total_limit: Int = Field(default=2, ge=1, le=1000, description="Checkpoints kept.")
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
    eval_steps: Int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Eval loss every N optimizer steps; null: ten times per run (every "
        "max(1, total_steps // 10) steps).",
    )
    # 200: the loss over every held-out example took 15-20 minutes on the 2-core CPU for 311
    # MedQuAD examples, twice a job at least (issue #20).
    eval_max_examples: Int | None = Field(
        default=200,
        ge=1,
        le=1_000_000,
        description="The eval loss is measured on a seeded sample (training_config.seed) of at "
        "most this many held-out examples, the same sample every time; the job's notes say "
        "how many. null: every held-out example.",
    )

    early_stopping: EarlyStoppingSection | None = Field(
        default=None,
        description="Stop when the eval loss (every eval_steps) stopped improving; needs a "
        "validation split and eval_strategy 'steps'. null: train to max_steps or the epochs.",
    )
    keep: Literal["best", "last"] = Field(
        default="last",
        description="Which weights become the adapter: the last step's, or those of the "
        "evaluation with the lowest eval loss ('best' needs a validation split).",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] | None = Field(
        default=None,
        max_length=3,
        description="Trackers that get every metric row, the spec as params and the adapter: "
        "exactly these. null: tensorboard, plus mlflow when the worker has "
        "MEDTUNE_MLFLOW_TRACKING_URI and wandb when it has WANDB_API_KEY.",
    )

    @field_validator("output_dir")
    @classmethod
    def _relative_name(cls, value: str) -> str:
        if not _SAFE_NAME.fullmatch(value):
            raise ValueError("use a plain folder name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("num_train_epochs")
    @classmethod
    def _some_length(cls, value: float, info: ValidationInfo) -> float:
        # Declared after max_steps, so info.data holds it (absent if it failed validation).
        if value == 0 and info.data.get("max_steps", 1) <= 0:
            raise ValueError(
                "num_train_epochs is 0 and max_steps is not above 0, so nothing would train: set "
                "max_steps > 0, or num_train_epochs > 0"
            )
        return value

    @model_validator(mode="after")
    def _one_half_precision(self) -> TrainingSection:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 cannot both be true; set one, or leave both null")
        return self


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


class WebhookSection(_Section):
    url: str = Field(
        min_length=1,
        max_length=2048,
        description="An http(s) URL the service POSTs job.succeeded, job.failed and "
        "job.cancelled events to. Loopback and private-network targets are refused unless the "
        "server sets MEDTUNE_WEBHOOK_ALLOW_PRIVATE.",
    )
    secret: str = Field(
        min_length=16,
        max_length=256,
        description="Signs each delivery (webhook-signature: v1,<base64 HMAC-SHA256 of "
        "'<webhook-id>.<webhook-timestamp>.<body>'>); a 'whsec_<base64>' secret is used "
        "base64-decoded, as Standard Webhooks does. Never shown back: GET /jobs/{id} masks it.",
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
    webhook: WebhookSection | None = Field(
        default=None, description="Where to send the job's final status, signed; null: nowhere."
    )

    model_config = ConfigDict(extra="forbid", validate_by_alias=True, validate_by_name=False)

    @field_validator("lora")
    @classmethod
    def _loftq_quantises_a_full_base(cls, value: LoraSection, info: ValidationInfo) -> LoraSection:
        # Declared after `model`, so info.data holds it (absent if it failed validation).
        model = info.data.get("model")
        if value.loftq_config is not None and model is not None and model.load_in_4bit:
            raise ValueError(
                "loftq_config quantises a full-precision base itself, but model_config."
                "load_in_4bit is true: set load_in_4bit to false, or loftq_config to null"
            )
        return value

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

    @field_validator("training")
    @classmethod
    def _early_stopping_needs_evaluations(
        cls, cfg: TrainingSection, info: ValidationInfo
    ) -> TrainingSection:
        # Declared after the datasets, so info.data holds them (absent if they failed).
        if cfg.early_stopping is None and cfg.keep == "last":
            return cfg
        what = "early_stopping" if cfg.early_stopping else "keep 'best'"
        dataset = info.data.get("dataset")
        no_share = dataset is None or dataset.validation_share <= 0
        if info.data.get("validation_dataset") is None and no_share:
            raise PydanticCustomError(
                "needs_validation",
                f"training_config.{what} compares eval losses, and this job has no validation "
                "split: set training_dataset.validation_share (e.g. 0.1) or a validation_dataset",
            )
        if cfg.eval_strategy != "steps" and (cfg.early_stopping or cfg.eval_strategy == "no"):
            raise PydanticCustomError(
                "needs_validation",
                f"training_config.{what} needs evaluations during training: set "
                "training_config.eval_strategy to 'steps'",
            )
        return cfg

    @field_validator("training")
    @classmethod
    def _method_fits(cls, cfg: TrainingSection, info: ValidationInfo) -> TrainingSection:
        return check_method(cfg, info)  # dpo / orpo: no packing, no mix (core/spec/preference.py)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


SECRET_MASK = "********"


def public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as a client may see it: the webhook secret masked."""
    hook = spec.get("webhook")
    if isinstance(hook, dict) and hook.get("secret"):
        return {**spec, "webhook": {**hook, "secret": SECRET_MASK}}
    return spec
