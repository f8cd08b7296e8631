"""experiments/step_profile.py: HLO thunks are put in the right categories, asynchronous thunks are timed to their
completion, overlapping time is not counted twice, and a tiny real trace is read end to end."""

import gzip
import json

import pytest

from experiments import step_profile

HLO = """
HloModule jit_train_step
  %conv_general_dilated.3 = f32[8,64,64,16]{3,2,1,0} convolution(%x.1, %w.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/jvp()/conv_general_dilated"}
  %convolution = f32[8,64,64,16]{3,2,1,0} convolution(%a, %b), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/transpose(jvp())/conv_general_dilated"}
  %convolution.1 = f32[16,3,3,16]{3,2,1,0} convolution(%c, %d), window={size=64x64 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %transpose_copy_fusion = f32[64,64,8,16]{3,2,1,0} fusion(%e), kind=kLoop, calls=%fused_computation
  ROOT %add_concatenate_fusion.8 = f32[8,8,8,8]{3,2,1,0} fusion(%f), kind=kLoop, calls=%fc
  %reduce-window.2 = f32[8,32,32,16]{3,2,1,0} reduce-window(%g, %h), window={size=1x2x2x1 stride=1x2x2x1}
  %ynn_fusion.152 = f32[4]{0} fusion(%conv_general_dilated.145, %constant.489), kind=kCustom, calls=%fc.152
"""


def test_hlo_instructions_and_categories():
    table = step_profile.hlo_instructions(HLO)
    category = {name: step_profile.jax_category(name, table) for name in table}
    assert category == {
        "conv_general_dilated.3": "conv forward",
        "convolution": "conv input gradient",
        "convolution.1": "conv kernel gradient",
        "transpose_copy_fusion": "copies (layout, concat)",
        "add_concatenate_fusion.8": "the rest (BatchNorm, activations, loss, optimizer)",
        "reduce-window.2": "pooling",
        "ynn_fusion.152": "the rest (BatchNorm, activations, loss, optimizer)",
    }


@pytest.mark.parametrize("op, category", [("aten::convolution_backward", "conv input gradient"),
                                          ("aten::mkldnn_convolution", "conv forward"),
                                          ("aten::cat", "copies (layout, concat)"),
                                          ("aten::max_pool2d_with_indices_backward", "pooling"),
                                          ("aten::native_batch_norm", step_profile.CATEGORIES[-1])])
def test_torch_categories(op, category):
    assert step_profile.torch_category(op) == category


def test_overlapping_time_is_shared_not_counted_twice():
    totals = step_profile.attribute([("a", 0.0, 10.0), ("b", 5.0, 15.0), ("c", 20.0, 30.0)])
    assert totals == pytest.approx({"a": 7.5, "b": 7.5, "c": 10.0})
    assert sum(totals.values()) == pytest.approx(25.0)  # the union of the intervals; the gap 15-20 is nobody's


def test_asynchronous_thunks_run_to_their_completion_event(tmp_path):
    events = [  # a convolution returning at once and completing later; a fusion with no completion event
        {"ph": "X", "name": "convolution", "ts": 100.0, "dur": 2.0},
        {"ph": "X", "name": "fusion.1", "ts": 103.0, "dur": 4.0},
        {"ph": "X", "name": "end: convolution", "ts": 150.0, "dur": 0.2},
        {"ph": "X", "name": "convolution", "ts": 200.0, "dur": 1.0},  # the next step's run
        {"ph": "X", "name": "end: convolution", "ts": 260.0, "dur": 0.2},
    ]
    trace = tmp_path / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    with gzip.open(trace / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    intervals = sorted(step_profile._thunk_intervals(str(tmp_path)))
    assert intervals == [("convolution", 100.0, 150.0), ("convolution", 200.0, 260.0), ("fusion.1", 103.0, 107.0)]


def test_tiny_step_profile_end_to_end(tmp_path, capsys):
    status = step_profile.main(["step_profile", "--config=configs/unet.py:size=32,batch=8,dtype=float32",
                                "--config.model.features=4", "--config.model.depth=2", "--steps=1",
                                f"--out={tmp_path}"])
    assert status == 0
    data = json.loads((tmp_path / "step_profile_unet.json").read_text())
    ms = data["anemia_jax"]["ms"]
    assert ms["conv forward"] > 0 and ms["conv input gradient"] > 0 and ms["conv kernel gradient"] > 0
    # Thunks cover most of the step; the rest is dispatch and the gaps between thunks.
    assert 0.3 * data["anemia_jax"]["step_wall_ms"] < sum(ms.values()) <= 1.05 * data["anemia_jax"]["step_wall_ms"]
    assert "| conv forward |" in capsys.readouterr().out
