"""ONNX Runtime as the prediction engine of an exported model: what ``predict --onnx`` and ``app --onnx`` run.

`OnnxModel(path)` opens a model written by ``python -m anemia_jax.export --format=onnx`` with ONNX Runtime on the CPU
and reads the model card the exporter stored in it (`anemia_jax.inference.model_card`): the input size, the targets
and their threshold, the runs it came from. `OnnxModel.members` gives each member's probabilities ``[M, N, H, W, C]``
-- an ensemble's ``member_probabilities`` output, a single model's ``probabilities`` as its one member -- which is
what `anemia_jax.inference.segmenter.Segmenter` makes of photos, as it does with the JAX engine's
`anemia_jax.inference.probabilities.members_fn`. Normalisation, test-time augmentation, pruning and the averaging of
an ensemble are inside the graph, fixed at export.

Why a second engine: nothing is compiled. The JAX engine compiles its program when it starts (seconds per model on
a laptop CPU, more for an ensemble; the persistent compilation cache helps the second start only), ONNX Runtime opens
the file in well under a second, and in steady state the two are close on a CPU (experiments/results/photo_latency/
has both, measured side by side). ONNX Runtime is an optional dependency (``pip install onnxruntime``, or the
package's ``[onnx]`` extra); this module imports only NumPy until a model is opened.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from anemia_jax.utils import errors

__all__ = ["CARD_KEY", "OnnxModel", "onnxruntime_module"]

CARD_KEY = "anemia_jax.model_card"  # where export_onnx stores the card in the model's metadata
_INPUT = "images"
_MEAN, _MEMBERS = "probabilities", "member_probabilities"


def onnxruntime_module():
    """``import onnxruntime``, or a `errors.ConfigError` saying how to install it (exit status 2 in a command)."""
    try:
        import onnxruntime  # noqa: PLC0415 -- optional dependency
    except ImportError as e:
        raise errors.ConfigError(
            f"--onnx needs ONNX Runtime, which is not installed in this Python environment ({e}). Install it with "
            "`pip install onnxruntime` (or `pip install -e '.[onnx]'`), or predict with the training runs "
            "(--workdir=RUN) instead.") from None
    return onnxruntime


class OnnxModel:
    """An exported anemia_jax model in ONNX Runtime.

    Args:
        path: the ``.onnx`` file (``python -m anemia_jax.export --format=onnx``).
        threads: ONNX Runtime's intra-op threads (default: its own choice, one per physical core).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file ONNX Runtime cannot open, or a model without an anemia_jax model card or with another
            interface (the message says which).
        errors.ConfigError: ONNX Runtime is not installed.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No ONNX model at {self.path}. Write one with `python -m anemia_jax.export "
                                    "--workdir=RUN --format=onnx --out=model.onnx` (README: Export a model).")
        ort = onnxruntime_module()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own classes for every kind of bad file
            raise ValueError(f"ONNX Runtime cannot open {self.path} ({type(e).__name__}: {str(e)[:300]}). Is it an "
                             "ONNX model, copied completely?") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if CARD_KEY not in meta:
            raise ValueError(f"{self.path} carries no anemia_jax model card ({CARD_KEY} in its metadata): it was not "
                             "written by `python -m anemia_jax.export --format=onnx`, so its input size, targets and "
                             "thresholds are unknown. Export the runs again with that command.")
        self.card: dict[str, Any] = json.loads(meta[CARD_KEY])
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [_INPUT] or _MEAN not in outputs:
            raise ValueError(f"{self.path} takes {inputs} and gives {outputs}; an anemia_jax export takes "
                             f"['{_INPUT}'] and gives ['{_MEAN}', ...]. Export the runs again.")
        self._output = _MEMBERS if _MEMBERS in outputs else _MEAN
        shape = self.card["input"]["shape"]
        self.image_size: tuple[int, int] = (int(shape[1]), int(shape[2]))
        self.targets: tuple[str, ...] = tuple(t["name"] for t in self.card["targets"])
        self.threshold = float(self.card["targets"][0]["threshold"])
        self.version = ort.__version__

    @property
    def runs(self) -> list[Mapping[str, Any]]:
        """The card's entries of the runs the model was exported from (workdir, checkpoint, config)."""
        return list(self.card.get("runs", []))

    def members(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` at `image_size` -> float32 ``[M, N, H, W, C]``, each member's probabilities."""
        images_u8 = np.ascontiguousarray(images_u8, dtype=np.uint8)
        if images_u8.ndim != 4 or tuple(images_u8.shape[1:3]) != self.image_size:
            raise ValueError(f"images must be uint8 [N, {self.image_size[0]}, {self.image_size[1]}, 3]; got shape "
                             f"{images_u8.shape}.")
        out = np.asarray(self.session.run([self._output], {_INPUT: images_u8})[0], np.float32)
        return out if self._output == _MEMBERS else out[None]
