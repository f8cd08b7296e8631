"""Training configs (ml_collections, big_vision style), one file per model, all built by `configs.common`.

``python -m anemia_jax.main --config=configs/unetpp.py:data=phantom,size=128`` loads ``get_config('data=...')`` of
the file; every file is its model's block (`MODEL`, `TEST_MODEL`) handed to `configs.common.model_config`, which
adds everything shared (dataset, split, loss, optimizer, schedule, augmentation). The argument keys are documented
in configs/common.py.
"""
