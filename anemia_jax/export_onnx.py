"""``python -m anemia_jax.export_onnx BUNDLE --out=MODEL.onnx``: ONNX conversion, run in the ONNX environment.

The command that ``python -m anemia_jax.export --format=onnx`` runs in the second environment of "Export a model"
(README); what it does is `anemia_jax.inference.export_onnx`.
"""

import sys

from anemia_jax.inference.export_onnx import main

if __name__ == "__main__":
    sys.exit(main())
