"""The registered model as an MLflow pyfunc: what ``mlflow.pyfunc.load_model`` runs.

Kept apart from ``pipelines.registry`` because it imports MLflow at module level (the class
must subclass ``PythonModel``), and the registry's CLI must stay fast to import. MLflow pickles
the instance by reference, so this module travels with the model in its ``code_paths``.
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

import mlflow.pyfunc
import numpy as np

# Distributions the pyfunc model needs at load time (recorded with their installed versions).
REQUIREMENTS = ("torch", "torchvision", "numpy", "scipy", "pycocotools", "pyyaml", "pillow", "pandas", "mlflow")



class VistrPyfunc(mlflow.pyfunc.PythonModel):
    """A VisTR model as an MLflow pyfunc: one clip of frames in, its instance sequences out."""

    def load_context(self, context: Any) -> None:
        from vistr.inference import ClipPredictor
        from vistr.predict import load_model_file

        model, cfg = load_model_file(context.artifacts["checkpoint"])
        self.predictor = ClipPredictor(model, cfg)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads type hints as a schema
        """``model_input``: uint8 RGB frames [L, H, W, 3] of one clip (L <= T). Returns one row per
        instance sequence: score, category_id and the per-frame RLE masks (YouTube-VIS results
        ``segmentations``, JSON-encoded), as the official postprocess makes them."""
        import pandas as pd

        from vistr.inference import tracks_to_results

        frames = np.asarray(model_input)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [L, H, W, 3], got shape {frames.shape}")
        results = tracks_to_results(self.predictor(frames.astype(np.uint8)), video_id=0)
        return pd.DataFrame({
            "instance": np.arange(len(results), dtype=np.int64),
            "score": np.array([r["score"] for r in results], dtype=np.float64),
            "category_id": np.array([r["category_id"] for r in results], dtype=np.int64),
            "segmentations": [json.dumps(r["segmentations"]) for r in results],
        })  # fmt: skip


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([ColSpec("long", "instance"), ColSpec("double", "score"),
                        ColSpec("long", "category_id"), ColSpec("string", "segmentations")]),
    )  # fmt: skip


def requirements() -> list[str]:
    pins = []
    for dist in REQUIREMENTS:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        # Local build tags (torch 2.x+cpu) are not on PyPI; the version range is what matters.
        pins.append(f"{dist}=={version.split('+')[0]}")
    return pins
