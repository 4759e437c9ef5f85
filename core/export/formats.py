"""Export a finished job's model, and prove each artifact still answers.

Formats (``export_config.formats``) and where they land in the job's artifacts folder
(``$MEDTUNE_HOME/jobs/<id>/``)::

    adapter/                     lora: adapter_model.safetensors + adapter_config.json + tokenizer
    merged_16bit/                merged_16bit: LoRA folded into the base, bfloat16 safetensors
    merged_4bit/                 merged_4bit: the merged weights in bitsandbytes NF4 (what
                                 Unsloth's save_pretrained_merged(save_method="merged_4bit") writes)
    gguf/model-f16.gguf          gguf + gguf_quantizations: f16, q8_0, q4_k_m (llama.cpp files;
    gguf/model-q8_0.gguf         chat template, end-of-turn eos and tokenizer inside, so a
    gguf/model-q4_k_m.gguf       llama.cpp reader needs nothing else)
    artifacts.json               the manifest, below

The manifest has one entry per format (``lora``, ``merged_16bit``, ``merged_4bit``,
``gguf_f16``, ``gguf_q8_0``, ``gguf_q4_k_m``), plus ``hub`` after a push::

    {"status": "ok", "folder": "gguf", "files": [{"file", "bytes", "sha256"}],
     "smoke_test": [{"question", "answer", "stopped", "tokens", ...}]}
    {"status": "failed", "error": {"code", "message"}}
    {"status": "running"}          while a worker exports it

Each artifact is smoke-tested after it is written: loaded by the loader its users use
(transformers, llama.cpp) and asked the two fixed medical questions (the LoRA adapter: its files
are checked to hold exactly the model in memory, which then answers, so nothing is loaded
again); the answers and whether each stopped at the end-of-turn token go into the manifest. A
failed format fails alone, with a code; a later export (``POST /jobs/{id}/exports``) updates
its own entries and keeps the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import ExportError, MedtuneError

MANIFEST = "artifacts.json"  # in the job's artifacts folder
SMOKE_QUESTIONS = ["What is high blood pressure?", "How is type 2 diabetes treated?"]
FORMATS = ("lora", "merged_16bit", "merged_4bit", "gguf")
GGUF_DIR = "gguf"
_MERGED_STAGING = ".merged-staging"  # a merged copy for merged_4bit/gguf when 16-bit is not kept


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(folder: Path) -> list[dict[str, Any]]:
    return [describe_file(p) for p in sorted(folder.iterdir()) if p.is_file()]


def describe_file(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}


def manifest_keys(formats: list[str], gguf_quantizations: list[str]) -> list[str]:
    """The manifest entries an export of ``formats`` writes (gguf: one per quantization)."""
    keys = [f for f in formats if f != "gguf"]
    if "gguf" in formats:
        keys += [f"gguf_{q}" for q in gguf_quantizations]
    return keys


def read_manifest(job_dir: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((job_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest


def update_manifest(job_dir: Path, entries: dict[str, Any]) -> dict[str, Any]:
    """Replace ``entries`` in the manifest, keep the others; written atomically."""
    manifest = {**read_manifest(job_dir), **entries}
    tmp = job_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, job_dir / MANIFEST)
    return manifest


def failed_entry(fmt: str, exc: Exception) -> dict[str, Any]:
    if isinstance(exc, MedtuneError):
        error = {"code": exc.code, "message": exc.detail[:500]}
    else:
        error = {"code": f"export_{fmt}_failed", "message": f"{type(exc).__name__}: {exc}"[:500]}
    return {"status": "failed", "error": error}


def _ask(model: Any, tokenizer: Any, system: str, *, max_new_tokens: int) -> list[dict[str, Any]]:
    from core.evaluation.run import answer_questions

    # One batch: the questions decode together, so the smoke test costs one answer's time.
    prompts = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}]
        for q in SMOKE_QUESTIONS
    ]
    return answer_questions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts)
    )


def load_kwargs() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"dtype": torch.bfloat16, "device_map": {"": 0}}
    return {"dtype": torch.float32}


def check_saved_adapter(model: Any, folder: Path) -> None:
    """The adapter folder holds exactly the in-memory adapter: its config reads back, and every
    saved tensor equals the model's (so the model in memory answers as the files would)."""
    import torch
    from peft import PeftConfig, get_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        PeftConfig.from_pretrained(str(folder))
        saved = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as exc:
        raise ExportError(
            f"the saved adapter cannot be read back ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
            field="export_config.formats",
            code="adapter_invalid",
        ) from exc
    current = get_peft_model_state_dict(model)
    differing = sorted(set(saved) ^ set(current)) or [
        name
        for name, tensor in saved.items()
        if not torch.equal(tensor, current[name].detach().to("cpu", tensor.dtype))
    ]
    if differing:
        raise ExportError(
            f"the saved adapter differs from the trained one ({differing[0]}); train the job again",
            field="export_config.formats",
            code="adapter_invalid",
        )


def _smoke_lora(loaded: Any, folder: Path, system: str, max_new_tokens: int) -> list[Any]:
    """The saved adapter is checked to be the model in memory, which then answers: loading the
    base and the adapter again would give the same answers (the recipe's 8B base: 16 GB read)."""
    check_saved_adapter(loaded.model, folder)
    loaded.model.eval()
    return _ask(loaded.model, loaded.tokenizer, system, max_new_tokens=max_new_tokens)


def _smoke_merged(folder: Path, system: str, max_new_tokens: int) -> list[Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = load_kwargs()
    if (folder / "config.json").is_file() and "quantization_config" in (
        json.loads((folder / "config.json").read_text())
    ):
        kwargs.pop("dtype")  # a bitsandbytes folder says its own dtypes
        kwargs.setdefault("device_map", {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return _ask(model, AutoTokenizer.from_pretrained(folder), system, max_new_tokens=max_new_tokens)


def _write_merged(loaded: Any, target: Path) -> None:
    import torch

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if loaded.engine == "unsloth":  # dequantises the 4-bit base before merging
        loaded.model.save_pretrained_merged(str(tmp), loaded.tokenizer, save_method="merged_16bit")
    elif "bnb4bit" in loaded.engine:
        raise ExportError(
            "merging into a 4-bit bitsandbytes base loses precision; train with "
            "engine 'unsloth' or load_in_4bit false for a merged export",
            field="export_config.formats",
            code="export_merge_unsupported",
        )
    else:
        merged = loaded.model.merge_and_unload()  # folds LoRA into the base weights, in place
        merged.to(torch.bfloat16).save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def bnb_4bit_supported() -> bool:
    """bitsandbytes quantizes NF4 on CUDA, and on the CPU from 0.46 (its CPU backend)."""
    import importlib.metadata

    import torch
    from packaging.version import Version

    try:
        version = Version(importlib.metadata.version("bitsandbytes"))
    except importlib.metadata.PackageNotFoundError:
        return False
    return torch.cuda.is_available() or version >= Version("0.46")


def _write_merged_4bit(loaded: Any, merged_dir: Path | None, target: Path) -> None:
    """NF4 (double-quantized) bitsandbytes weights of the merged model, saved as safetensors."""
    import torch

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if loaded.engine == "unsloth":
        # Unsloth's own route; "forced" because it otherwise refuses 4-bit merges.
        loaded.model.save_pretrained_merged(
            str(tmp), loaded.tokenizer, save_method="merged_4bit_forced"
        )
    else:
        if not bnb_4bit_supported():
            raise ExportError(
                "merged_4bit needs bitsandbytes with 4-bit support: a CUDA GPU, or "
                "bitsandbytes >= 0.46 on the CPU (pip install 'medtune[export]')",
                field="export_config.formats",
                code="export_requires_cuda",
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        assert merged_dir is not None
        cuda = torch.cuda.is_available()
        compute = torch.bfloat16 if cuda else torch.float32
        quantized = AutoModelForCausalLM.from_pretrained(
            merged_dir,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
            dtype=compute,
            device_map={"": 0 if cuda else "cpu"},
        )
        quantized.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(merged_dir).save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _keep_sentencepiece_model(base_path: str, folder: Path) -> None:
    """A fast tokenizer's save_pretrained writes no tokenizer.model; the GGUF writer needs the
    base model's SentencePiece scores, so the merged folder keeps a copy."""
    source = Path(base_path) / "tokenizer.model"
    if source.is_file() and not (folder / "tokenizer.model").exists():
        shutil.copy2(source, folder / "tokenizer.model")


@contextmanager
def _merged_source(
    loaded: Any, job_dir: Path, formats: list[str], outcome: dict[str, Any]
) -> Iterator[Path | None]:
    """The merged 16-bit folder that merged_4bit and gguf start from.

    ``merged_16bit`` itself when it was exported now; else a staging copy, removed afterwards.
    None when merging failed (the error is in ``outcome["merge_error"]``).
    """
    if "merged_16bit" in formats and outcome.get("merged_16bit", {}).get("status") == "ok":
        yield job_dir / "merged_16bit"
        return
    if "merged_16bit" in formats:  # it was asked for and failed: the others fail with it
        outcome["merge_error"] = ExportError(
            "the merged model these formats start from could not be written: "
            + outcome["merged_16bit"]["error"]["message"],
            field="export_config.formats",
            code=outcome["merged_16bit"]["error"]["code"],
        )
        yield None
        return
    staging = job_dir / _MERGED_STAGING
    try:
        _write_merged(loaded, staging)
    except Exception as exc:
        outcome["merge_error"] = exc
        yield None
        return
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _entry(folder: Path, files: list[dict[str, Any]], answers: list[Any]) -> dict[str, Any]:
    return {"status": "ok", "folder": folder.name, "files": files, "smoke_test": answers}


def _run(fmt: str, outcome: dict[str, Any], step: Callable[[], dict[str, Any]]) -> None:
    try:
        outcome[fmt] = step()
    except Exception as exc:  # one format failing must not take the others down
        outcome[fmt] = failed_entry(fmt, exc)


def _export_gguf(
    merged_dir: Path,
    job_dir: Path,
    quantizations: list[str],
    *,
    name: str,
    system: str,
    max_new_tokens: int,
    outcome: dict[str, Any],
) -> None:
    from core.export import gguf as gguf_export

    folder = job_dir / GGUF_DIR
    folder.mkdir(exist_ok=True)
    f16 = folder / gguf_export.file_name("f16")
    try:
        gguf_export.require_llama_cpp()
        gguf_export.write_f16(merged_dir, f16, name=name)
    except Exception as exc:  # every quantization starts from the f16 file
        for quant in quantizations:
            outcome[f"gguf_{quant}"] = failed_entry("gguf", exc)
        f16.unlink(missing_ok=True)
        return
    try:
        for quant in quantizations:
            path = folder / gguf_export.file_name(quant)

            def step(quant: str = quant, path: Path = path) -> dict[str, Any]:
                if quant != "f16":
                    gguf_export.quantize(f16, path, quant)
                answers = gguf_export.smoke_test(
                    path,
                    merged_dir,
                    system=system,
                    questions=SMOKE_QUESTIONS,
                    max_new_tokens=max_new_tokens,
                )
                return _entry(folder, [describe_file(path)], answers)

            _run(f"gguf_{quant}", outcome, step)
    finally:
        if "f16" not in quantizations:
            f16.unlink(missing_ok=True)


def export_all(
    loaded: Any,
    *,
    job_dir: Path,
    adapter_dir: Path,
    base_path: str,
    formats: list[str],
    system_prompt: str,
    gguf_quantizations: list[str] | None = None,
    name: str = "model",
    max_new_tokens: int = 96,
    gguf_max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Write and smoke-test each format; returns (and saves) the manifest.

    Merging goes after ``lora``: it changes the in-memory model. merged_4bit and gguf start from
    the merged 16-bit folder. ``gguf_max_new_tokens`` (default ``max_new_tokens``) bounds the
    llama.cpp answers.
    """
    quantizations = list(gguf_quantizations or ["q4_k_m"])
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(
            f"unknown export formats {unknown}; choose from {list(FORMATS)}",
            field="export_config.formats",
            code="invalid_export_format",
        )
    outcome: dict[str, Any] = {}
    if "lora" in formats:
        _run(
            "lora",
            outcome,
            lambda: _entry(
                adapter_dir,
                describe(adapter_dir),
                _smoke_lora(loaded, adapter_dir, system_prompt, max_new_tokens),
            ),
        )
    if "merged_16bit" in formats:
        target = job_dir / "merged_16bit"

        def merged_16bit() -> dict[str, Any]:
            _write_merged(loaded, target)
            _keep_sentencepiece_model(base_path, target)
            answers = _smoke_merged(target, system_prompt, max_new_tokens)
            return _entry(target, describe(target), answers)

        _run("merged_16bit", outcome, merged_16bit)
    if "merged_4bit" in formats or "gguf" in formats:
        with _merged_source(loaded, job_dir, formats, outcome) as merged_dir:
            if merged_dir is None:
                for key in manifest_keys(
                    [f for f in formats if f in ("merged_4bit", "gguf")], quantizations
                ):
                    outcome[key] = failed_entry(key, outcome["merge_error"])
            else:
                _keep_sentencepiece_model(base_path, merged_dir)
                if "merged_4bit" in formats:
                    target4 = job_dir / "merged_4bit"

                    def merged_4bit() -> dict[str, Any]:
                        _write_merged_4bit(loaded, merged_dir, target4)
                        answers = _smoke_merged(target4, system_prompt, max_new_tokens)
                        return _entry(target4, describe(target4), answers)

                    _run("merged_4bit", outcome, merged_4bit)
                if "gguf" in formats:
                    _export_gguf(
                        merged_dir,
                        job_dir,
                        quantizations,
                        name=name,
                        system=system_prompt,
                        max_new_tokens=gguf_max_new_tokens or max_new_tokens,
                        outcome=outcome,
                    )
    outcome.pop("merge_error", None)
    return update_manifest(job_dir, outcome)
