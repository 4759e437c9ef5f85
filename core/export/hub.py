"""Push a job's exported artifacts to the Hugging Face Hub (``export_config.push_to_hub``).

The repository is ``<hugging_face_username>/<finetuned_model>``, created if missing (private),
and the artifacts keep the job folder's layout (``adapter/``, ``merged_16bit/``,
``merged_4bit/``, ``gguf/model-<quant>.gguf``) in one commit. The token comes from the
environment (``HF_TOKEN``), never from the spec. Offline, without a token or with a refused
one, the push fails with a code and the artifacts already written stay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.errors import ExportError

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def repo_id(username: str | None, finetuned_model: str) -> str:
    if not username:
        raise ExportError(
            "push_to_hub needs hugging_face_username (the Hub account or organisation)",
            field="hugging_face_username",
            code="hub_username_missing",
        )
    return f"{username}/{finetuned_model}"


def _token() -> str:
    for name in TOKEN_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    raise ExportError(
        "push_to_hub needs a Hugging Face write token in the worker's environment (HF_TOKEN)",
        field="export_config.push_to_hub",
        code="hub_token_missing",
    )


def pushable_files(job_dir: Path, manifest: dict[str, Any], formats: list[str]) -> list[str]:
    """Paths, relative to the job folder, of the listed files of the formats that are ok."""
    paths = []
    for fmt in formats:
        entry = manifest.get(fmt) or {}
        if entry.get("status") != "ok":
            continue
        for described in entry["files"]:
            relative = f"{entry['folder']}/{described['file']}"
            if not (job_dir / relative).is_file():
                raise ExportError(
                    f"artifact {relative} was deleted from the server; export {fmt} again",
                    field="export_config.formats",
                    code="artifact_missing",
                )
            paths.append(relative)
    return paths


def push(job_dir: Path, files: list[str], *, repo: str) -> dict[str, Any]:
    """Create ``repo`` if needed and upload ``files`` in one commit; returns where they went."""
    if not files:
        raise ExportError(
            "nothing to push: no export format succeeded",
            field="export_config.formats",
            code="hub_nothing_to_push",
        )
    token = _token()
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ExportError(
            "the Hugging Face Hub cannot be reached: HF_HUB_OFFLINE=1 on the worker",
            field="export_config.push_to_hub",
            code="hub_unreachable",
        )
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo, repo_type="model", private=True, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo,
            repo_type="model",
            folder_path=str(job_dir),
            allow_patterns=files,
            commit_message="medtune export",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        code = "hub_auth_failed" if status in (401, 403) else "hub_push_failed"
        raise ExportError(
            f"the Hub refused the push to {repo} (HTTP {status}): {str(exc).splitlines()[0]}",
            field="export_config.push_to_hub",
            code=code,
        ) from exc
    except (OSError, httpx.TransportError) as exc:  # no route, DNS, refused, timed out
        raise ExportError(
            f"the Hugging Face Hub cannot be reached: {type(exc).__name__}",
            field="export_config.push_to_hub",
            code="hub_unreachable",
        ) from exc
    return {"repo_id": repo, "url": f"{api.endpoint}/{repo}", "commit": commit.oid, "files": files}
