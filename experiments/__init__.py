"""Experiment scripts (benchmarks and research protocols), run as modules from the repository root, e.g.
``python -m experiments.protocols --mode=cv --config=configs/unet.py:data=phantom``; each records its command,
commit, machine and results next to what it writes (`experiments.provenance`)."""
