"""Preference training (training_config.method 'dpo' or 'orpo') with TRL's trainers, reporting
to the same metrics sink, checkpoints and cancel checks as SFT (CountingTrainer, SinkCallback).

One path on every engine: the pairs are tokenized by medtune (core.data.preference) and handed
to TRL as ids, so the chat template, the gate and the budgets are the ones the job's data stage
used. DPO is trl.DPOTrainer; ORPO is trl.experimental.orpo.ORPOTrainer (TRL 1.x keeps ORPO
among its experimental trainers only). With the Unsloth engine, Unsloth's PatchDPOTrainer is
called first, as its DPO recipe does (recent releases patch TRL's trainers when unsloth is
imported, and keep PatchDPOTrainer as a no-op).

The DPO reference costs no second model: with a peft model and no ref_model, TRL 1.x adds a
frozen adapter named "ref", a copy of the trainable one taken when the trainer is built, and
scores the reference through it. A fresh adapter is zero, so "ref" is the base; an adapter
continued from another job (model_config.init_adapter) is that job's tuned model. medtune
sets "ref" to the adapter as loaded (a retry after an out-of-memory error builds a second
trainer on trained weights) and removes it when training ends, so the saved adapter and the
exports hold the trained adapter alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from core.data.preference import EncodedPair
from core.data.tokenize import IGNORE_INDEX
from core.spec import JobSpec
from core.spec.preference import lengths
from core.training.engines import Loaded
from core.training.held_out import eval_sample
from core.training.meter import StepMeter
from core.training.sink import MetricsSink
from core.training.trainer import (
    TrainingRun,
    TrainOutcome,
    no_kv_cache,
    padding_id,
    training_arguments,
)

REFERENCE = "ref"  # the adapter name TRL's DPOTrainer scores the reference with
# TRL's logged keys -> metric row columns (rewards are beta x log-ratio to the reference for
# DPO, beta x mean log-probability for ORPO).
REWARDS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margin",
    "rewards/accuracies": "rewards_accuracy",
}
EVAL_REWARDS = {
    "rewards/margins": "eval_rewards_margin",
    "rewards/accuracies": "eval_rewards_accuracy",
}


class CountingCollator:
    """Wraps a TRL preference collator: adds the real-token and pair counts CountingTrainer
    reads (and strips before the model sees the batch)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(self.inner(features))
        masks = [
            v
            for k, v in batch.items()
            if k.endswith("attention_mask") and k != "prompt_attention_mask"
        ]
        batch["_real_tokens"] = int(sum(int(m.sum()) for m in masks))
        batch["_samples"] = len(features)
        return batch


def orpo_features(item: EncodedPair) -> dict[str, list[int]]:
    """The ids in the layout trl's ORPOTrainer tokenizes to (prompt + answer, answer labels)."""
    out: dict[str, list[int]] = {
        "prompt_input_ids": item.prompt_ids,
        "prompt_attention_mask": [1] * len(item.prompt_ids),
    }
    for name, answer in (("chosen", item.chosen_ids), ("rejected", item.rejected_ids)):
        ids = item.prompt_ids + answer
        out[f"{name}_input_ids"] = ids
        out[f"{name}_attention_mask"] = [1] * len(ids)
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(item.prompt_ids) + answer
    return out


def _trainer_class(method: str, engine: str) -> Any:
    """A CountingTrainer over TRL's trainer for ``method``: medtune's counting, checkpoint
    publishing and held-out scoring on top of TRL's preference loss."""
    from core.training.counting_trainer import CountingTrainer

    if engine == "unsloth":
        from unsloth import PatchDPOTrainer  # patches TRL's preference trainers for Unsloth

        PatchDPOTrainer()
    if method == "dpo":
        from trl import DPOTrainer as Base
    else:
        from trl.experimental.orpo import ORPOTrainer as Base

    class PreferenceTrainer(CountingTrainer, Base):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset  # DPO: medtune's pairs are tokenized already

        def tokenize_row(self, feature: Any, model: Any = None) -> Any:
            return feature  # ORPO: medtune's pairs are tokenized already

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            # A checkpoint holds the trained adapter alone: transformers resumes a folder that
            # has adapter subfolders by loading those only, so TRL's "ref" copy there would
            # leave the trained weights behind. The reference is set again on resume.
            super()._save(output_dir, state_dict)
            shutil.rmtree(Path(output_dir or self.args.output_dir) / REFERENCE, ignore_errors=True)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # TRL adds the step's averaged rewards to ``logs`` before the callbacks see it;
            # they land on the row SinkCallback just wrote for this step.
            super().log(logs, start_time)
            if "loss" in logs:
                values = {column: logs.get(key) for key, column in REWARDS.items()}
                self.sink.log(self.state.global_step, _finite(values))

        def held_out_loss(self, batches: list[dict[str, Any]]) -> float | None:
            """The preference loss on the held-out pairs, averaged per pair; its reward margin
            and accuracy go to the sink on the same step."""
            import torch

            model, total, count, metrics = self.model, 0.0, 0, []
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for batch in batches:
                        inputs = self._prepare_inputs(self.model_inputs(batch))
                        with self.compute_loss_context_manager():
                            loss, found = self._eval_batch(model, inputs)
                        total += float(loss.detach()) * batch["_samples"]
                        count += batch["_samples"]
                        metrics.append((batch["_samples"], found))
            finally:
                model.train(was_training)
            if not count:
                return None
            values = {
                column: sum(n * m.get(key, 0.0) for n, m in metrics) / count
                for key, column in EVAL_REWARDS.items()
            }
            self.sink.log(self.state.global_step, _finite(values))
            return _finite({"loss": total / count})["loss"]

        def _eval_batch(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, float]]:
            if method == "orpo":  # its compute_loss files every batch under training metrics
                loss, found = self.get_batch_loss_metrics(model, inputs, train_eval="eval")
                return loss, {k.removeprefix("eval_"): v for k, v in found.items()}
            self._metrics["eval"].clear()
            loss = self.compute_loss(model, inputs)
            found = {k: sum(v) / len(v) for k, v in self._metrics["eval"].items() if v}
            self._metrics["eval"].clear()
            return loss, found

    return PreferenceTrainer


def plain_lm_head(model: Any) -> None:
    """TRL 1.15's DPOTrainer scores tokens through a fused LM head whose kernel is written in
    Triton, which CPU builds of torch lack; there the same outputs (log-probabilities of the
    labels, entropy, mean logit, top-1 hits, zero where a label is -100) come from the whole
    logits, as transformers computes them. Hosts with Triton keep TRL's kernel."""
    import torch
    from trl.trainer import utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patched = base.forward  # TRL's: with fused_lm_head=False it is the model's own forward

    def forward(
        *args: Any,
        fused_lm_head: bool = False,
        labels: Any = None,
        shift_labels: Any = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:
            return patched(
                *args,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        out = patched(*args, **kwargs)
        logits = out.logits.float()
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != IGNORE_INDEX
        log_all = logits.log_softmax(-1)
        log_probs = log_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        with torch.no_grad():
            entropy = -(log_all.exp() * log_all).sum(-1) * mask
            log_sum_sq = torch.logsumexp(2 * log_all, -1) * mask
            mean_logits = logits.mean(-1) * mask
            is_top1 = (logits.argmax(-1) == labels) & mask
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return trl_utils.FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
            aux_loss=getattr(out, "aux_loss", None),
        )

    base.forward = forward


def _finite(values: dict[str, Any]) -> dict[str, float | None]:
    from core.training.counting_trainer import finite

    return {k: finite(v) for k, v in values.items()}


def _config(spec: JobSpec, loaded: Loaded, output_dir: Path, notes: list[str]) -> Any:
    """DPOConfig / ORPOConfig: the SFT job's training arguments plus the preference knobs."""
    cfg = spec.training.preference
    beta = cfg.beta if cfg else 0.1
    prompt, completion = lengths(cfg, spec.model.max_seq_length)
    if spec.training.method == "dpo":
        from trl import DPOConfig

        loss = (cfg.loss_type if cfg else None) or "sigmoid"
        extra: dict[str, Any] = {"beta": beta, "loss_type": [loss], "max_length": None}
        return training_arguments(
            spec, loaded, output_dir=output_dir, notes=notes, args_class=DPOConfig, **extra
        )
    from trl.experimental.orpo import ORPOConfig

    extra = {"beta": beta, "max_length": prompt + completion, "max_completion_length": completion}
    return training_arguments(
        spec, loaded, output_dir=output_dir, notes=notes, args_class=ORPOConfig, **extra
    )


def _reference_weights(loaded: Loaded) -> dict[str, Any]:
    """The trainable adapter's weights as loaded (kept on the CPU), taken once per loaded
    model: the DPO reference, also for a trainer built again after an out-of-memory retry."""
    snapshot = getattr(loaded, "_reference_weights", None)
    if snapshot is None:
        snapshot = {
            name: param.detach().to("cpu", copy=True)
            for name, param in loaded.model.named_parameters()
            if ".default." in name
        }
        loaded._reference_weights = snapshot  # type: ignore[attr-defined]
    return snapshot


def _set_reference(model: Any, snapshot: dict[str, Any]) -> None:
    """Load the adapter as loaded into TRL's frozen "ref" adapter."""
    import torch

    if REFERENCE not in getattr(model, "peft_config", {}):
        return
    with torch.no_grad():
        for name, value in snapshot.items():
            ref = model.get_parameter(name.replace(".default.", f".{REFERENCE}."))
            ref.copy_(value.to(ref.device, ref.dtype))
            ref.requires_grad_(False)


def drop_reference(model: Any) -> None:
    """Remove TRL's "ref" adapter: the saved adapter and the exports hold the trained one."""
    if REFERENCE in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE)
        model.set_adapter("default")


def _collator(method: str, pad_id: int) -> Any:
    if method == "dpo":
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        return CountingCollator(DataCollatorForPreference(pad_token_id=pad_id))
    from trl.experimental.utils import DPODataCollatorWithPadding

    return CountingCollator(DPODataCollatorWithPadding(pad_token_id=pad_id))


def train(
    spec: JobSpec,
    loaded: Loaded,
    items: list[EncodedPair],
    *,
    output_dir: Path,
    sink: MetricsSink,
    resume_from: Path | None = None,
    eval_items: list[EncodedPair] | None = None,
) -> TrainOutcome:
    """Train a dpo or orpo job to its end (or a cancel), as core.training.trainer.train does an
    sft job: the same sink rows (plus rewards), checkpoints, resume, eval and early stopping;
    the eval loss is the preference loss on the held-out pairs."""
    from datasets import Dataset

    notes: list[str] = []
    method, model = spec.training.method, loaded.model
    snapshot = _reference_weights(loaded) if method == "dpo" else None
    drop_reference(model)  # an earlier trainer's (an out-of-memory retry), built on trained weights
    features = orpo_features if method == "orpo" else EncodedPair.features
    tokenizer = loaded.tokenizer
    collator = _collator(method, padding_id(tokenizer))
    no_kv_cache(model)
    trainer = _trainer_class(method, loaded.engine)(
        model=model,
        args=_config(spec, loaded, output_dir, notes),
        train_dataset=Dataset.from_list([features(i) for i in items]),
        data_collator=collator,
        processing_class=tokenizer,
        sink=sink,
        meter=StepMeter(),
        engine=loaded.engine,
        save_total_limit=spec.training.save_total_limit,
    )
    if method == "dpo":
        plain_lm_head(model)
    if snapshot is not None:
        _set_reference(model, snapshot)
    size = spec.training.per_device_train_batch_size
    sample, eval_note = eval_sample(spec, eval_items or [])
    notes += [eval_note] if eval_note else []
    held = [features(i) for i in sample]
    batches = [collator(held[i : i + size]) for i in range(0, len(held), size)]
    run = TrainingRun(spec, trainer, sink, batches)
    try:
        run.train(resume_from)
    finally:  # failed or not, the model leaves with the trained adapter alone
        drop_reference(model)
    return run.outcome(model, [*notes, f"{method} with TRL's {type(trainer).__mro__[2].__name__}"])
