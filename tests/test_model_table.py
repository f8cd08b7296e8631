"""experiments/model_table.py builds each row's model from its config file as training does, and prints the table."""

from experiments import model_table


def test_rows_are_the_configs_models(capsys):
    assert model_table.main(["model_table", "--size=64", "--configs=unetpp,unet_resnet34"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | fields | parameters | GFLOPs/image at 64² (forward) |"
    # In `ROWS` order: the ResNet U-Nets (configs/unet_resnet34.py and its encoder swaps), then UNet++, which
    # configs/unetpp.py trains deeply supervised: three more 1x1 heads than the model's default (the README's table).
    assert [line.split(" | ")[1] for line in lines[2:5]] == ["encoder=resnet18", "encoder=resnet34", "encoder=resnet50"]
    assert lines[3].startswith("| `unet` | encoder=resnet34 | 24,436,369 | ")
    assert lines[5].startswith("| `unetpp` | deep_supervision=True | 9,045,924 | ") and len(lines) == 6
    assert all(float(line.split(" | ")[3].rstrip(" |")) > 0 for line in lines[2:])


def test_unknown_config_is_a_message(capsys):
    assert model_table.main(["model_table", "--configs=unett"]) == 2
    assert "no configs/unett.py" in capsys.readouterr().err
