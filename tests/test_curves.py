"""The training curves (workshop/curves.py): a train.py log drawn as one picture."""
import json

import pytest
from PIL import Image

from workshop import curves as curves_cli

# -------------------------------------------------------------------------------------------------
# Training curves of a train.py log

def log_record(step, offset=0.0):
    """A train.py log record: three tasks at well-apart losses, two of them routed over 5 experts."""
    loss = {"vqa": 1.0 + offset, "refer": 2.0 + offset, "qa": 3.0 + offset}
    return {"step": step, "loss": 2.0, "task_loss": loss, "lr": 1e-4 * step / 150, "grad_norm": 0.5 + step / 300,
            "tokens_per_s": 100.0, "peak_mem_gb": 1.0,
            "routing": {"vqa": [0.6, 0.1, 0.1, 0.1, 0.1], "refer": [0.1, 0.1, 0.1, 0.1, 0.6]}}


def test_training_curves_one_continuous_curve_per_task(tmp_path):
    # a run logs steps 10-100, crashes, resumes from its checkpoint at step 50 and logs 60-150 again
    records = [log_record(s) for s in range(10, 101, 10)] + [log_record(s, offset=0.5) for s in range(60, 151, 10)]
    log = tmp_path / "ckpt.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    png, curves = curves_cli.plot_training(str(log))
    assert png == str(tmp_path / "ckpt.png")
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width == 900  # the README's width
        pixels = img.convert("RGB")
    assert list(curves["loss"]) == ["vqa", "refer", "qa"] and list(curves["routing"]) == ["vqa", "refer"]
    for task, (steps, losses) in curves["loss"].items():
        assert steps == list(range(10, 151, 10))  # each step once, in order
        base = {"vqa": 1.0, "refer": 2.0, "qa": 3.0}[task]
        assert losses == [base + (0.5 if s >= 60 else 0.0) for s in steps]  # the later record of a step wins
    assert curves["lr"][0] == curves["grad_norm"][0] == list(range(10, 151, 10))
    assert all(len(weights) == 5 for weights in curves["routing"].values())
    # every task of the log is drawn as a line across the plot (far more pixels of its colour than
    # its legend swatch has), and no other task is drawn
    counts = {colour: n for n, colour in pixels.getcolors(1 << 24)}
    for task, colour in curves_cli.TASK_COLOURS.items():
        if task in curves["loss"]:
            assert counts.get(colour, 0) > 400, task
        else:
            assert colour not in counts, task


def test_training_log_errors_name_the_line(tmp_path):
    log = tmp_path / "bad.jsonl"
    log.write_text(json.dumps(log_record(10)) + "\n" + '{"step": 20, "task_loss": {"vqa": 1.0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, row 1: malformed row, not JSON"):
        curves_cli.training_records(str(log))
    log.write_text(json.dumps({**log_record(10), "task_loss": {"xray": 1.0}}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: 'task_loss' names unknown tasks \['xray'\]"):
        curves_cli.training_records(str(log))
    log.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        curves_cli.training_records(str(log))


def test_plot_flag_draws_a_log_and_names_a_bad_one(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_text(json.dumps({"step": 10, "task_loss": {"vqa": 1.0}, "lr": 1e-3, "grad_norm": 1.0,
                               "routing": {"vqa": [0.5, 0.5]}}) + "\n")
    curves_cli.main([str(log)])
    assert (tmp_path / "run.png").exists() and f"curves: {tmp_path / 'run.png'}" in capsys.readouterr().out
    log.write_text(json.dumps({"step": 10, "task_loss": {"xray": 1.0}}) + "\n")
    with pytest.raises(SystemExit, match="run.jsonl, row 0: 'task_loss' names unknown tasks"):
        curves_cli.main([str(log)])
