"""The inference engine on the real SmolLM2: adapter cache, adapter errors, batching, stops."""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest

from core.errors import JobNotReady
from core.inference.adapters import AdapterInvalid, AdapterMissing, NoAdapter
from core.inference.engine import InferenceEngine, InferenceRequest
from core.inference.generate import GenerationRequest, TextTracker, generate_one

BASE = "smollm2-135m-instruct"
QUESTIONS = ["What is anemia?", "How is the flu treated?", "What causes a fever?"]


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(model_dir, root / f"job_{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def engine(model_cache: Path) -> InferenceEngine:
    # Two adapters at most, one request per batch: the LRU is what is under test.
    return InferenceEngine(models_dir=model_cache, max_adapters=2, max_batch=1)


def answer(engine: InferenceEngine, adapter: Path | None, question: str = QUESTIONS[0]) -> dict:
    return engine.answer(
        base_model=BASE,
        messages=ask(question),
        adapter_dir=str(adapter) if adapter else None,
        adapter_name=adapter.name if adapter else None,
        max_new_tokens=6,
        backend="transformers",
    )


def test_second_question_to_a_job_loads_nothing(engine: InferenceEngine, adapters: list[Path]):
    first = answer(engine, adapters[0])
    loads = dict(engine.loads)
    assert loads["base"] == 1 and loads["adapter"] == 1
    second = answer(engine, adapters[0], QUESTIONS[1])
    assert dict(engine.loads) == loads
    assert first["answer"] and second["answer"]
    assert first["backend"] == "transformers"


def test_third_adapter_evicts_the_least_recently_used(
    engine: InferenceEngine, adapters: list[Path]
) -> None:
    a, b, c = adapters
    answer(engine, a)
    answer(engine, b)
    answer(engine, a)  # a is now the most recently used: b is the one to go
    loaded = engine.loads["adapter"]
    answer(engine, c)
    assert engine.loads["adapter"] == loaded + 1
    assert engine.loads["evicted"] >= 1
    answer(engine, a)  # still cached
    assert engine.loads["adapter"] == loaded + 1
    answer(engine, b)  # evicted, so loaded again
    assert engine.loads["adapter"] == loaded + 2


def test_adapter_changes_the_answer_and_base_ignores_it(
    engine: InferenceEngine, adapters: list[Path]
) -> None:
    base = answer(engine, None)["answer"]
    tuned = answer(engine, adapters[0])["answer"]
    assert tuned != base
    assert answer(engine, None)["answer"] == base  # the adapter is off for base requests


def test_a_broken_adapter_folder_is_refused(
    engine: InferenceEngine, adapters: list[Path], tmp_path: Path
) -> None:
    no_config = tmp_path / "no_config"
    shutil.copytree(adapters[0], no_config)
    (no_config / "adapter_config.json").unlink()
    damaged = tmp_path / "damaged"
    shutil.copytree(adapters[0], damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    for folder in (no_config, damaged):
        with pytest.raises(AdapterInvalid) as info:
            answer(engine, folder)
        assert info.value.code == "adapter_invalid" and info.value.field == "job_id"
    # The base model is untouched by the refused folders.
    assert engine.answer(base_model=BASE, messages=ask("Hi"), max_new_tokens=2)["answer"]


def test_a_deleted_adapter_is_refused_even_when_cached(
    engine: InferenceEngine, adapters: list[Path], tmp_path: Path
) -> None:
    copy = tmp_path / "deleted_job"
    shutil.copytree(adapters[1], copy)
    answer(engine, copy)
    shutil.rmtree(copy)
    with pytest.raises(AdapterMissing) as info:
        answer(engine, copy)
    assert info.value.code == "adapter_missing" and info.value.status == 409
    never = tmp_path / "never_there"
    with pytest.raises(AdapterMissing):
        answer(engine, never)


@pytest.mark.parametrize("source", ["store", "sent"])
def test_a_job_without_adapter_is_refused(
    sqlite_url: str, model_cache: Path, tmp_path: Path, source: str
) -> None:
    """The same refusals whether the worker reads the job or gets what the API read of it."""
    from core.inference.remote import job_target
    from core.inference.task import build_request
    from core.settings import Settings
    from core.spec import JobSpec
    from core.store import jobs
    from core.store.db import session_scope
    from core.store.models import JobStatus
    from tests.helpers import recipe_spec

    full_precision = recipe_spec("sample:medical_qa")
    full_precision["model_config"]["load_in_4bit"] = False
    with session_scope(sqlite_url) as s:
        done = jobs.create_job(s, JobSpec.model_validate(full_precision)).id
        queued = jobs.create_job(s, JobSpec.model_validate(recipe_spec("sample:medical_qa"))).id
        job = jobs.get_job(s, done)
        job.status, job.adapter_dir = JobStatus.succeeded, None
        s.add(job)
        s.commit()
        sent = {job_id: job_target(jobs.get_job(s, job_id)) for job_id in (done, queued)}
    # "sent": the worker's store is an empty file, so answering from it would fail.
    store = sqlite_url if source == "store" else f"sqlite:///{tmp_path / 'empty.db'}"
    settings = Settings(_env_file=None, database_url=store, model_cache=model_cache)  # type: ignore[call-arg]

    def build(job_id: str, use_adapter: bool = True) -> InferenceRequest:
        return build_request(
            settings,
            job_id=job_id,
            base_model=None,
            messages=ask("Hi"),
            use_adapter=use_adapter,
            options={},
            job=sent[job_id] if source == "sent" else None,
        )

    with pytest.raises(NoAdapter) as info:
        build(done)
    assert info.value.code == "no_adapter" and info.value.field == "job_id"
    with pytest.raises(JobNotReady):
        build(queued)
    base = build(done, use_adapter=False)
    assert base.adapter_dir is None and base.base_model == BASE
    assert base.load_in_4bit is False  # the job's own spec, not the default


def test_batched_answers_equal_unbatched_under_greedy(
    model_cache: Path, adapters: list[Path]
) -> None:
    # A long window so that the requests submitted together land in one batch.
    engine = InferenceEngine(models_dir=model_cache, max_batch=4, batch_wait_s=0.5)
    requests = [
        (QUESTIONS[0], None, 10),
        (QUESTIONS[1], adapters[0], 7),
        (QUESTIONS[2], adapters[1], 10),
        ("Is a sore throat serious? Answer in one word.", adapters[0], 4),
    ]

    def submit(question: str, adapter: Path | None, limit: int) -> Future[dict]:
        return engine.submit(
            InferenceRequest(
                base_model=BASE,
                messages=ask(question),
                adapter_dir=str(adapter) if adapter else None,
                adapter_name=adapter.name if adapter else None,
                max_new_tokens=limit,
                backend="transformers",
            )
        )

    alone = [submit(*r).result() for r in requests]
    assert all(a["batch_size"] == 1 for a in alone)
    together = [f.result() for f in [submit(*r) for r in requests]]
    assert [t["batch_size"] for t in together] == [4] * 4
    assert [t["answer"] for t in together] == [a["answer"] for a in alone]
    assert [t["usage"] for t in together] == [a["usage"] for a in alone]
    # Rows stop at their own limit inside the batch.
    assert [t["usage"]["completion_tokens"] for t in together] == [10, 7, 10, 4]


@pytest.fixture(scope="module")
def plain(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


def test_stop_strings_cut_the_answer_and_deltas_add_up(plain) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = plain
    full = generate_one(
        model, tokenizer, GenerationRequest(messages=ask(QUESTIONS[0]), max_new_tokens=16)
    )
    words = full.text.split()
    assert len(words) > 4 and full.finish_reason == "length"
    stop = " " + words[3]  # cut before the fourth word
    deltas: list[str] = []
    cut = generate_one(
        model,
        tokenizer,
        GenerationRequest(
            messages=ask(QUESTIONS[0]), max_new_tokens=16, stop=(stop,), on_delta=deltas.append
        ),
    )
    assert cut.finish_reason == "stop" and not cut.stopped_on_eos
    assert cut.text == full.text[: full.text.index(stop)].strip()
    assert "".join(deltas) == cut.text
    assert cut.completion_tokens < full.completion_tokens


def test_end_of_turn_stops_and_is_counted(plain) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = plain
    ids = tokenizer("Rest and fluids. ", add_special_tokens=False)["input_ids"]
    deltas: list[str] = []
    tracker = TextTracker(
        tokenizer,
        stop=(),
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=50,
        on_delta=deltas.append,
    )
    for token in [*ids, tokenizer.eos_token_id, *ids]:
        tracker.add(token)
    assert tracker.stopped_on_eos and tracker.finish_reason == "stop"
    assert tracker.answer == "Rest and fluids." == "".join(deltas)
    assert len(tracker.ids) == len(ids) + 1  # the end-of-turn token counts; nothing after it


def test_the_token_limit_ends_with_length(plain) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = plain
    ids = tokenizer("one two three four five", add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tokenizer, stop=(), eos_token_id=tokenizer.eos_token_id, max_new_tokens=2)
    for token in ids:
        tracker.add(token)
    assert tracker.finish_reason == "length" and len(tracker.ids) == 2
    assert tracker.answer == tokenizer.decode(ids[:2]).strip()
