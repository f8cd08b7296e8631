"""Where one CPU train step's time goes, anemia_jax beside the PyTorch peer, by kind of work (not a test).

    python -m experiments.step_profile --config=configs/unetpp.py:size=128,batch=8,dtype=float32 \
        --peer=../shared/tools/peer_bench.py --steps=3 --out=experiments/results/cpu_speed/profile

anemia_jax side: the benchmark's train step (`experiments.benchmark`: same model, batch, loss and optimizer as the
peer) is traced with `jax.profiler` for ``--steps`` steps; every XLA CPU thunk of the trace is matched to its HLO
instruction in the compiled program and put in a category: convolution forward, its input gradient, its kernel
gradient (1x1 convolutions that XLA turned into matmuls included), copies (the layout transposes XLA inserts around convolutions, concatenations), pooling,
and the rest (BatchNorm, activations, loss, optimizer: XLA fuses them together). PyTorch side: the peer's own model and step
(``peer_bench.torch_models``) under ``torch.profiler``, its aten operators put in the same categories where they map
(``convolution_backward`` computes both gradients, so its two columns are one figure).

Times are per step, in milliseconds, summed over operators: XLA's thunk executor and PyTorch's intra-op threads both
use every core, so a row is CPU-side wall time of that operator kind, and the rows add up to about the step's wall
time (printed beside them). Figures belong to the machine they ran on; run it on an otherwise idle CPU.
"""

from __future__ import annotations

import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence

CATEGORIES = ("conv forward", "conv input gradient", "conv kernel gradient", "copies (layout, concat)", "pooling",
              "the rest (BatchNorm, activations, loss, optimizer)")
_REST = CATEGORIES[-1]

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """``{instruction name: (result shape, opcode, the rest of its line)}`` of an HLO module's text."""
    table = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            table[match.group(1)] = (match.group(2), match.group(3), line[match.end():])
    return table


def jax_category(name: str, instructions: Mapping[str, tuple[str, str, str]]) -> str:
    """The category (`CATEGORIES`) of the XLA CPU thunk ``name`` (an HLO instruction of the compiled step)."""
    shape, opcode, rest = instructions.get(name, ("", "", ""))
    if opcode == "convolution":
        window = re.search(r"window=\{size=(\d+)x(\d+)", rest)
        dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0].split("[", 1)[-1])]
        small_window = window is not None and int(window.group(1)) <= 3 and int(window.group(2)) <= 3
        # The kernel gradient convolves activations with the output gradient: a window as large as the image, or a
        # result shaped like a kernel (k x k spatial dims). XLA's own rewrites of it often carry no metadata.
        if not small_window or (len(dims) == 4 and (dims[:2] in ([3, 3], [1, 1]) or dims[1:3] in ([3, 3], [1, 1]))):
            return "conv kernel gradient"
        op_name = re.search(r'op_name="([^"]*)"', rest)
        if op_name:  # JAX names the backward pass transpose(jvp(...))
            return "conv input gradient" if "transpose(" in op_name.group(1) else "conv forward"
        return "conv forward" if name.startswith("conv_general_dilated") else "conv input gradient"
    if opcode == "dot":  # 1x1 convolutions (upsampling, heads) become matmuls
        op_name = re.search(r'op_name="([^"]*)"', rest)
        return "conv input gradient" if op_name and "transpose(" in op_name.group(1) else "conv forward"
    if opcode in ("copy", "transpose", "concatenate") or re.match(r"(wrapped_)?(transpose|copy|concatenate)", name):
        return "copies (layout, concat)"
    if opcode in ("reduce-window", "select-and-scatter") or re.search(r"reduce[-_]window|select[-_]and[-_]scatter", name):
        return "pooling"
    return _REST


_TORCH_CATEGORIES = (
    (("convolution_backward", "mkldnn_convolution_backward", "convolution_backward_overrideable"),
     "conv input gradient"),  # both gradients in one operator: reported on this row
    (("mkldnn_convolution", "_convolution", "convolution", "conv2d", "_slow_conv2d_forward",
      "slow_conv_transpose2d", "conv_transpose2d"), "conv forward"),
    (("copy_", "contiguous", "clone", "cat", "_to_copy", "to", "permute", "transpose", "as_strided"),
     "copies (layout, concat)"),
    (("max_pool2d", "max_pool2d_with_indices", "max_pool2d_with_indices_backward"), "pooling"),
)


def torch_category(op: str) -> str:
    """The category (`CATEGORIES`) of the aten operator ``op`` (e.g. ``aten::convolution_backward``)."""
    name = op.split("::", 1)[-1]
    for names, category in _TORCH_CATEGORIES:
        if name in names:
            return category
    return _REST


def _thunk_intervals(trace_dir: str) -> list[tuple[str, float, float]]:
    """``(thunk name, start, end)`` in microseconds of every XLA CPU thunk run in the Perfetto trace under
    ``trace_dir``. A thunk that runs asynchronously (convolutions on Eigen's thread pool) returns at once and logs an
    ``end: <name>`` event when its work completes: its interval runs to that event, not to its own return."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"step_profile: jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}.")
    with gzip.open(sorted(paths)[-1]) as f:
        trace = json.load(f)
    events = sorted((e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"),
                    key=lambda e: float(e["ts"]))
    starts: dict[str, list[list]] = collections.defaultdict(list)
    for event in events:
        name, ts = event["name"], float(event["ts"])
        if name.startswith("end: "):
            pending = [iv for iv in starts.get(name[5:], []) if not iv[3]]
            if pending:  # the oldest run of that thunk still waiting for its completion
                pending[0][2], pending[0][3] = max(pending[0][2], ts), True
        else:
            starts[name].append([name, ts, ts + float(event.get("dur", 0.0)), False])
    return [(iv[0], iv[1], iv[2]) for runs in starts.values() for iv in runs]


def attribute(intervals: Iterable[tuple[str, float, float]]) -> dict[str, float]:
    """``{name: microseconds}``: the wall time covered by ``intervals``, each moment shared equally among the
    intervals active then (so overlapping thunks are not counted twice and the values add up to the busy time)."""
    boundaries = sorted({t for _, start, end in intervals for t in (start, end)})
    totals: dict[str, float] = collections.defaultdict(float)
    ordered = sorted(intervals, key=lambda iv: iv[1])
    active: list[tuple[str, float, float]] = []
    i = 0
    for left, right in zip(boundaries, boundaries[1:]):
        while i < len(ordered) and ordered[i][1] <= left:
            active.append(ordered[i])
            i += 1
        active = [iv for iv in active if iv[2] > left]
        for name, _, _ in active:
            totals[name] += (right - left) / len(active)
    return dict(totals)


def profile_jax(config, steps: int) -> dict:
    """Per-step milliseconds by category of the benchmark's train step for ``config``, and the step's wall time."""
    import jax

    from anemia_jax.training import experiment
    from anemia_jax.utils import parallel
    from experiments import benchmark

    mesh = parallel.make_mesh()
    model, tx, train_step, abstract_batch = benchmark.make_step(config, mesh)
    compiled = train_step.lower(experiment.abstract_train_state(model, tx, tuple(config.image_size), mesh),
                                abstract_batch).compile()
    state = experiment.init_train_state(config, model, tx, mesh)
    batch = parallel.host_local_to_global(benchmark.synthetic_batch(config), mesh)
    for _ in range(2):  # past any first-run cost
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    instructions = hlo_instructions(compiled.as_text())
    with tempfile.TemporaryDirectory(prefix="anemia_jax_profile_") as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        wall = (time.perf_counter() - t) / steps
        jax.profiler.stop_trace()
        intervals = [iv for iv in _thunk_intervals(trace_dir) if iv[0] in instructions]
    thunks = attribute(intervals)
    by_category: dict[str, float] = collections.defaultdict(float)
    for name, micros in thunks.items():
        by_category[jax_category(name, instructions)] += micros / 1e3 / steps
    top = sorted(((micros / 1e3 / steps, name, jax_category(name, instructions)) for name, micros in thunks.items()),
                 reverse=True)[:15]
    return {"step_wall_ms": wall * 1e3, "ms": dict(by_category),
            "top": [{"ms": ms, "op": name, "category": cat} for ms, name, cat in top]}


def profile_torch(peer_path: str, arch: str, batch: int, size: int, steps: int) -> dict:
    """The same for the PyTorch peer's model and step (float32, channels_last, Adam), by aten operator."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("peer_bench", peer_path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    UNet, UNetPP = peer.torch_models(tnn, F, torch)
    model = (UNet() if arch == "unet" else UNetPP()).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.7).float()

    def step():  # peer_bench.bench_torch's step, float32
        logits = model(x).float()
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y) + dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t) / steps
    by_category: dict[str, float] = collections.defaultdict(float)
    rows = []
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("Optimizer"):
            ms = event.self_cpu_time_total / 1e3 / steps
            by_category[torch_category(event.key)] += ms
            rows.append((ms, event.key))
    return {"step_wall_ms": wall * 1e3, "ms": dict(by_category),
            "top": [{"ms": ms, "op": op, "category": torch_category(op)} for ms, op in sorted(rows, reverse=True)[:15]],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def markdown(jax_side: Mapping, torch_side: Mapping | None) -> str:
    """The side-by-side table (ms per step by category; PyTorch's columns empty without a peer)."""
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.0f}"

    def row(label: str, ours: float, theirs: float | None, merged: bool = False) -> str:
        theirs_text = "(in the row above)" if merged else cell(theirs)
        difference = "" if theirs is None or merged else f"{ours - theirs:+.0f}"
        return f"| {label} | {ours:.0f} | {theirs_text} | {difference} |"

    lines = ["| work | anemia_jax ms/step | PyTorch eager ms/step | difference |", "|---|---:|---:|---:|"]
    for category in CATEGORIES:
        theirs = torch_side["ms"].get(category, 0.0) if torch_side else None
        # PyTorch's convolution_backward computes both gradients: one figure, on the input-gradient row.
        merged = torch_side is not None and category == "conv kernel gradient"
        lines.append(row(category, jax_side["ms"].get(category, 0.0), theirs, merged))
    lines.append(row("**time covered by operators**", sum(jax_side["ms"].values()),
                     sum(torch_side["ms"].values()) if torch_side else None))
    lines.append(row("**step wall time**", jax_side["step_wall_ms"], torch_side["step_wall_ms"] if torch_side else None))
    return "\n".join(lines) + "\n"


def _top(rows: Iterable[Mapping]) -> str:
    return "\n".join(f"| {r['op']} | {r['category']} | {r['ms']:.1f} |" for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags

    from anemia_jax import cli
    from experiments import provenance

    argv = list(sys.argv if argv is None else argv)
    cmd = cli.Command("python -m experiments.step_profile", __doc__)
    cmd.config_flag()
    flags.DEFINE_integer("steps", 3, "Profiled steps (after two untimed ones).", flag_values=cmd.flags)
    flags.DEFINE_string("peer", "", "peer_bench.py: profile the PyTorch peer beside ours ('' skips it).",
                        flag_values=cmd.flags)
    flags.DEFINE_string("out", "", "Folder for step_profile.md/.json ('' prints only).", flag_values=cmd.flags)
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK
    except cli.CommandLineError as e:
        return cmd.fail(e)
    from experiments import benchmark

    config = benchmark.benchmark_config(cmd.config, cmd.config_overrides())
    start = time.perf_counter()
    jax_side = profile_jax(config, cmd.steps)
    torch_side = None
    if cmd.peer:
        arch = config.model.name
        if arch not in ("unet", "unetpp") or config.model.get("encoder"):
            return cmd.fail(cli.CommandLineError(f"No PyTorch peer for {arch}; drop --peer."))
        torch_side = profile_torch(cmd.peer, arch, config.batch_size, config.image_size[0], cmd.steps)
    table = markdown(jax_side, torch_side)
    body = table + "\n### Largest anemia_jax operators (ms per step)\n\n| HLO instruction | category | ms |\n" \
        "|---|---|---:|\n" + _top(jax_side["top"]) + "\n"
    if torch_side:
        body += "\n### Largest PyTorch operators (self CPU ms per step)\n\n| aten operator | category | ms |\n" \
            "|---|---|---:|\n" + _top(torch_side["top"]) + "\n"
    print(body)
    if cmd.out:
        record = provenance.record(argv[1:], time.perf_counter() - start, "-m experiments.step_profile")
        provenance.write_results(cmd.out, f"step_profile_{config.model.name}",
                                 f"Where a CPU train step goes: {config.model.name}", body,
                                 {"anemia_jax": jax_side, "torch": torch_side}, record,
                                 note="ms per step by kind of work; see experiments/step_profile.py")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
