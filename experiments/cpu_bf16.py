"""Does XLA on this jaxlib run bfloat16 convolutions on the CPU's matrix units (AMX-BF16, through oneDNN or YNNPACK)?
A probe, not a test: the convolutions of a U-Net level, float32 against bfloat16, under each CPU convolution route
XLA offers, beside PyTorch's oneDNN on the same shapes.

    python -m experiments.cpu_bf16 --out=experiments/results/cpu_bf16 [--torch_python=PYTHON] [--repeats=7]
        [--shape=8,128,128,64] [--rounds=2]

Each route is a fresh child process (XLA reads ``XLA_FLAGS`` once, at start):

* ``eigen`` -- the package's CPU flag (`anemia_jax.utils.xla_cpu`): convolutions taken from YNNPACK, so XLA's
  Eigen kernels run them (what training uses);
* ``ynnpack`` -- XLA's default on this jaxlib (``ANEMIA_JAX_XLA_CPU_FLAGS=0``): YNNPACK convolutions;
* ``onednn`` -- the package's flag plus ``--xla_cpu_experimental_onednn_fusion_type=individual_convolution``,
  XLA's oneDNN route (whose kernels include AMX ones);
* ``onednn_custom_call`` -- the package's flag plus ``--xla_cpu_use_onednn=true
  --xla_cpu_experimental_onednn_custom_call=true``, the older oneDNN rewriter (custom calls).

In each: a 3x3 "same" convolution NHWC ``--shape`` (C in = C out) with its input and weight gradients (`jax.vjp`),
each jitted alone, median wall time of ``--repeats`` calls after one warm-up, float32 and bfloat16 alternating; and,
from the compiled HLO, the element type each convolution is computed in and any oneDNN custom call: a bfloat16
convolution that XLA widens to float32 (convert, f32 convolution, convert back) cannot use the bf16 matrix units.
Beside them the same FLOPs as one matrix product (``im2col_matmul``: ``[N*H*W, 9C] @ [9C, C]``), to see whether
a bfloat16 dot fares better than a bfloat16 convolution. ``--torch_python`` adds
the same three convolutions in PyTorch (channels_last, float32 and bfloat16: PyTorch's CPU autocast runs
convolutions in bfloat16 through oneDNN, AMX on this CPU). Rounds alternate the order of the routes.

Results: ``<out>/cpu_bf16.md`` and ``.json`` (`experiments.provenance`: command, commit, machine, versions, load).
CPU-scale figures of this machine only.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from anemia_jax import cli
from experiments import provenance

ROUTE_FLAGS = {"onednn": "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
               "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"}
ROUTES = ("eigen", "ynnpack", "onednn", "onednn_custom_call")
DTYPES = ("float32", "bfloat16")
PARTS = ("forward", "input_grad", "weight_grad", "im2col_matmul")

_TORCH_CHILD = r"""
import json, statistics, sys, time
import torch
n, h, w, c, repeats = map(int, sys.argv[1:6])
torch.manual_seed(0)
out = {}
for dtype in ("float32", "bfloat16"):
    dt = getattr(torch, dtype)
    x = torch.randn(n, c, h, w).to(dt).to(memory_format=torch.channels_last).requires_grad_(True)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(dt).to(memory_format=torch.channels_last)
    y = conv(x)
    g = torch.randn_like(y)
    def fwd():
        with torch.no_grad():
            conv(x)
    def dgrad():
        torch.autograd.grad(y, x, g, retain_graph=True)
    def wgrad():
        torch.autograd.grad(y, conv.weight, g, retain_graph=True)
    a = torch.randn(n * h * w, 9 * c).to(dt)
    b = torch.randn(9 * c, c).to(dt)
    def mm():
        with torch.no_grad():
            torch.mm(a, b)
    times = {}
    for name, fn in (("forward", fwd), ("input_grad", dgrad), ("weight_grad", wgrad), ("im2col_matmul", mm)):
        fn()
        t = []
        for _ in range(repeats):
            s = time.perf_counter(); fn(); t.append(time.perf_counter() - s)
        times[name] = statistics.median(t)
    out[dtype] = times
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: None)()),
                  "times": out}))
"""


def _libraries(hlo: str) -> list[str]:
    """What a compiled HLO text says about its convolutions: the element type each is computed in (``conv:f32``,
    ``conv:bf16``) and oneDNN custom calls (``onednn-call``), sorted."""
    found = {f"conv:{m}" for m in re.findall(r"= (\w+)\[[^\]]*\]\{[^}]*\} convolution\(", hlo)}
    found |= {f"dot:{m}" for m in re.findall(r"= (\w+)\[[^\]]*\]\{[^}]*\} dot\(", hlo)}
    if re.search(r"custom_call_target=\"__onednn", hlo):
        found.add("onednn-call")
    return sorted(found)


def child(route: str, shape: Sequence[int], repeats: int) -> dict[str, Any]:
    """Measures in this process (its XLA_FLAGS set by the parent): ``{dtype: {part: seconds}}`` and the libraries."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp

    n, h, w, c = shape
    key = jax.random.PRNGKey(0)
    times: dict[str, dict[str, float]] = {d: {} for d in DTYPES}
    libraries: dict[str, dict[str, list[str]]] = {d: {} for d in DTYPES}
    programs = {}
    for dtype in DTYPES:
        x = jax.random.normal(key, (n, h, w, c), jnp.float32).astype(dtype)
        k = (jax.random.normal(key, (3, 3, c, c), jnp.float32) * 0.05).astype(dtype)

        def conv(x, k):
            return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        g = jnp.ones((n, h, w, c), dtype)
        # The same work as one matrix product (im2col's shape, N*H*W x 9C by 9C x C): does a bf16 dot fare better?
        a = jax.random.normal(key, (n * h * w, 9 * c), jnp.float32).astype(dtype)
        fns = {"im2col_matmul": (jax.jit(lambda a, b: a @ b), (a, k.reshape(9 * c, c))),
               "forward": (jax.jit(conv), (x, k)),
               "input_grad": (jax.jit(lambda x, k, g: jax.vjp(lambda a: conv(a, k), x)[1](g)[0]), (x, k, g)),
               "weight_grad": (jax.jit(lambda x, k, g: jax.vjp(lambda b: conv(x, b), k)[1](g)[0]), (x, k, g))}
        for part, (fn, args) in fns.items():
            compiled = fn.lower(*args).compile()
            libraries[dtype][part] = _libraries(compiled.as_text())
            jax.block_until_ready(compiled(*args))
            programs[(dtype, part)] = (compiled, args)
    for _ in range(repeats):  # float32 and bfloat16 interleaved: the machine's load hits both alike
        for (dtype, part), (compiled, args) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[dtype].setdefault(part, []).append(time.perf_counter() - start)
    medians = {d: {p: statistics.median(t) for p, t in parts.items()} for d, parts in times.items()}
    return {"route": route, "xla_flags": os.environ.get("XLA_FLAGS", ""), "times": medians, "libraries": libraries,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__}


def _route_env(route: str) -> dict[str, str]:
    from anemia_jax.utils import xla_cpu  # noqa: PLC0415

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if route == "ynnpack":
        env[xla_cpu.OPT_OUT] = "0"
        return env
    xla_cpu.apply(env)
    if route in ROUTE_FLAGS:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ROUTE_FLAGS[route]}".strip()
    env[xla_cpu.OPT_OUT] = "0"  # the child's own command line adds nothing more: the flags are all set here
    return env


def _run_child(route: str, shape: Sequence[int], repeats: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "experiments.cpu_bf16", f"--child={route}", f"--repeats={repeats}",
            f"--shape={','.join(map(str, shape))}", "--out=-"]
    done = subprocess.run(argv, env=_route_env(route), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"route {route} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_torch(python: str, shape: Sequence[int], repeats: int) -> dict[str, Any]:
    n, h, w, c = shape
    done = subprocess.run([python, "-c", _TORCH_CHILD, str(n), str(h), str(w), str(c), str(repeats)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the PyTorch child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]], shape: Sequence[int]) -> str:
    n, h, w, c = shape
    flops = 2 * n * h * w * c * c * 9
    lines = [f"3x3 convolution, NHWC {n}x{h}x{w}x{c} -> {c} ({flops / 1e9:.1f} GFLOP per part; im2col_matmul: the "
             f"same FLOPs as [{n * h * w}, {9 * c}] @ [{9 * c}, {c}]); median wall ms (GFLOP/s), per round.", "",
             "| round | engine / route | part | float32 ms | bfloat16 ms | bf16 speed-up | HLO (f32 / bf16 inputs) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for part in PARTS:
            f32, bf16 = row["times"]["float32"][part], row["times"]["bfloat16"][part]
            libs = row.get("libraries")
            lib = (f"{'+'.join(libs['float32'][part])} / {'+'.join(libs['bfloat16'][part])}" if libs else "oneDNN")
            lines.append(f"| {row['round']} | {row['route']} | {part} | {f32 * 1e3:.1f} ({flops / f32 / 1e9:.0f}) | "
                         f"{bf16 * 1e3:.1f} ({flops / bf16 / 1e9:.0f}) | {f32 / bf16:.2f}x | {lib} |")
    return "\n".join(lines) + "\n"


def _command() -> cli.Command:
    cmd = cli.Command("python -m experiments.cpu_bf16", __doc__)
    fv = cmd.flags
    flags.DEFINE_string("out", None, "Results folder.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_string("torch_python", "", "A Python with PyTorch, for its oneDNN convolutions beside XLA's.",
                        flag_values=fv)
    flags.DEFINE_integer("repeats", 7, "Timed calls per figure (median).", lower_bound=1, flag_values=fv)
    flags.DEFINE_list("shape", ["8", "128", "128", "64"], "N,H,W,C of the convolution.", flag_values=fv)
    flags.DEFINE_integer("rounds", 2, "Rounds over the routes (their order alternates).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored with the results.", flag_values=fv)
    flags.DEFINE_enum("child", None, list(ROUTES), "Internal: measure this route in this process.", flag_values=fv)
    return cmd


def main(argv: Sequence[str]) -> int:
    cmd = _command()
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK
        shape = [int(s) for s in cmd.shape]
        if len(shape) != 4 or min(shape) < 1:
            raise cli.CommandLineError(f"--shape takes N,H,W,C (four positive integers); got {cmd.shape}.")
    except (cli.CommandLineError, ValueError) as e:
        return cmd.fail(cli.CommandLineError(str(e)))
    if cmd.child:
        print(json.dumps(child(cmd.child, shape, cmd.repeats)), flush=True)
        return cli.EXIT_OK
    started, load_before = time.time(), os.getloadavg()
    rows = []
    for r in range(cmd.rounds):
        order = ROUTES if r % 2 == 0 else tuple(reversed(ROUTES))
        for route in order:
            rows.append({"round": r, **_run_child(route, shape, cmd.repeats)})
            print(f"round {r}: {route} done", flush=True)
        if cmd.torch_python:
            rows.append({"round": r, "route": "pytorch (oneDNN)", **_run_torch(cmd.torch_python, shape, cmd.repeats)})
    body = (f"Load average (1, 5, 15 min) at the start {[round(x, 2) for x in load_before]}, at the end "
            f"{[round(x, 2) for x in os.getloadavg()]}; {os.cpu_count()} CPU(s).\n\n" + _table(rows, shape))
    prov = provenance.record(argv[1:], time.time() - started, "-m experiments.cpu_bf16")
    path = provenance.write_results(cmd.out, "cpu_bf16", "bfloat16 convolutions on the CPU: XLA's routes and PyTorch",
                                    body, {"rows": rows, "shape": shape}, prov, cmd.note)
    print(body)
    print(f"Wrote {path}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
