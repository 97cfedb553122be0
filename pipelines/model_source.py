"""Where a model comes from: a local file, an MLflow run or a registered model version.

Expected MLflow artifact layout (what the registry stage logs; anything else is refused with a
message saying what was found):

    <artifact root of the run or model version>/
        checkpoint.pt      a vistr checkpoint (``vistr.checkpoint.save_checkpoint``: weights plus
                           the full run config under "config") or an official VisTR file
        ...                anything else (config.yaml, plots) is ignored

A registered model (``models:/``) is the pyfunc folder ``pipelines.registry`` logs; only its
``artifacts/checkpoint.pt`` is downloaded. Elsewhere ``checkpoint.pt`` may sit at the root or in one sub-folder level (e.g. ``model/checkpoint.pt``,
as ``mlflow.pyfunc`` / ``log_artifacts(dir, "model")`` place it). ``runs:/RUN_ID`` (whole run) or
``runs:/RUN_ID/model`` and ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` are accepted.
``mlflow`` is imported inside the functions only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vistr.config import Config

CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_MODEL_URI = "models:/vistr@champion"
MODEL_CHECKPOINT = f"artifacts/{CHECKPOINT_FILE}"  # inside a registered model (pipelines.registry)


class ModelSourceError(ValueError):
    """A model could not be resolved; the message says which source and what to do."""


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(("runs:/", "models:/")) or "://" in spec


def find_checkpoint(root: Path, uri: str) -> Path:
    """``checkpoint.pt`` at ``root`` or one folder below; refuses zero or several candidates."""
    found = sorted([*root.glob(CHECKPOINT_FILE), *root.glob(f"*/{CHECKPOINT_FILE}")])
    if len(found) == 1:
        return found[0]
    listing = ", ".join(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:10]) or "nothing"
    what = "several" if found else f"no {CHECKPOINT_FILE}"
    raise ModelSourceError(f"{uri}: {what} in the artifacts (found: {listing}); expected {CHECKPOINT_FILE} "
                           "with the config inside (see pipelines/model_source.py)")


@contextmanager
def local_checkpoint(spec: str | None, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local checkpoint file for ``spec`` while the context lasts. A path is yielded as is; an
    MLflow URI is downloaded into a temporary folder that is removed on exit, so that every
    ``vistr predict``/``evaluate`` against the registry does not leave another copy of the weights
    (100+ MB) behind. Callers read the file inside the context (the model is then in memory).
    ``None`` means the registry champion, if there is one."""
    if spec is not None and not is_mlflow_uri(spec):
        path = Path(spec)
        if not path.is_file():
            raise ModelSourceError(f"{path}: model file not found")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vistr-model-") as folder:
        yield download_checkpoint(spec, tracking_uri, Path(folder))


def download_checkpoint(spec: str | None, tracking_uri: str | None, dst: Path) -> Path:
    """Download the checkpoint of an MLflow URI (``None``: the champion) into ``dst``, which the
    caller owns and cleans up."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = spec or DEFAULT_MODEL_URI
    try:
        run_id = uri[len("runs:/"):].strip("/") if uri.startswith("runs:/") else ""
        if uri.startswith("models:/"):  # a registered pyfunc model: fetch the checkpoint, not the code
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{MODEL_CHECKPOINT}",
                                                            dst_path=str(dst)))  # fmt: skip
        if run_id and "/" not in run_id:  # a whole run: MLflow wants run_id= rather than a bare runs:/ID
            root = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dst)))
        else:
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException, OSError, HTTP errors
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if spec is None:
            raise ModelSourceError(
                f"no --model given and {DEFAULT_MODEL_URI} is not available from the tracking server "
                f"{mlflow.get_tracking_uri()} ({message}); pass --model CHECKPOINT or an MLflow URI"
            ) from exc
        raise ModelSourceError(f"{uri}: cannot download the model artifacts ({message})") from exc
    return root if root.is_file() else find_checkpoint(root, uri)


def load_model(spec: str | None, num_frames: int | None = None, tracking_uri: str | None = None
               ) -> tuple[Any, Config, str]:
    """(inference model, config, where it came from) for a checkpoint path or an MLflow URI
    (``None``: the registry champion). The weights are read inside ``local_checkpoint``, so a
    downloaded copy is gone when this returns."""
    from vistr.predict import load_inference_model

    with local_checkpoint(spec, tracking_uri) as path:
        model, cfg = load_inference_model(path, num_frames)
    return model, cfg, spec or f"{DEFAULT_MODEL_URI} (the default)"
