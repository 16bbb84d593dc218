"""Score a predictions file as evaluate.py does: any model's answers, the official metrics.

    python -m workshop.score predictions.jsonl

Fields per line: task, prediction, reference; answer_type for VQA; box [x, y, w, h] and image_size
[W, H] for REC. Predictions are cleaned as evaluate.py cleans them, then metrics.score_dataset.
"""
import sys

from data import parse_box
from lib.files import read_jsonl
from metrics import clean_prediction, score_dataset


def read_records(path):
    """The rows of a predictions .jsonl, grouped by task and cleaned as evaluate.py cleans them."""
    by_task = {}
    for n, row in read_jsonl(path, "predictions"):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {n}: not a JSON object")
        for key in ("task", "prediction") + (("box", "image_size") if row.get("task") == "refer" else ("reference",)):
            if key not in row:
                raise ValueError(f"{path}, row {n}: no '{key}' field")
        r = {**row, "prediction": clean_prediction(str(row["prediction"]), row["task"])}
        if row["task"] == "refer":
            r["pred_box"] = parse_box(r["prediction"])
        by_task.setdefault(row["task"], []).append(r)
    return by_task


def main(argv):
    if len(argv) != 1:
        sys.exit("usage: python -m workshop.score predictions.jsonl")
    try:
        for task, records in read_records(argv[0]).items():
            scores = score_dataset(task, records)
            print(f"{task} ({len(records)} samples): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, float)))
    except (ValueError, OSError) as e:  # a file that cannot be read, or a bad row: named in e
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
