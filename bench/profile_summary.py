"""Summarise a py-spy raw profile (`py-spy record -f raw`) of a training run into where the time goes.

    py-spy record -f raw -o outputs/bench/train.pyspy -- python -m bench.train_throughput
    python -m bench.profile_summary outputs/bench/train.pyspy

Each sample is charged to the first matching part of the training step, searched from the innermost frame out, so
the shares add up to 100% of the samples taken while the main thread was inside `Trainer` fitting code.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

# (part, a substring of a py-spy frame "function (file:line)"), innermost match wins.
PARTS = (
    ("loading (decode, crop, collate)", "_BaseDataLoaderIter.__next__"),
    ("augmentation (one grid_sample)", "BatchAugmentation.__call__"),
    ("optimizer (AdamW step)", "Optimizer.step"),
    ("optimizer (AdamW step)", "GradScaler.step"),
    ("backward", "backward (torch/_tensor.py"),
    ("forward + loss", "Trainer.train_step"),
    ("validation", "Trainer.validate"),
    ("checkpoint", "Trainer._save_progress"),
    ("schedule, smoothing, progress (Python)", "Trainer._train_epoch"),
)
SCOPE = "Trainer._fit_phase"


def summarise(raw: Path) -> dict[str, float]:
    """Return each part's share of the samples taken inside the training loop."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if SCOPE not in stack:
            continue
        frames = stack.split(";")
        counts[_part(frames)] += int(samples)
    total = sum(counts.values()) or 1
    return {part: round(count / total, 4) for part, count in counts.most_common()}


def _part(frames: list[str]) -> str:
    for frame in reversed(frames):
        for part, marker in PARTS:
            if marker in frame:
                return part
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a py-spy raw (collapsed stacks) file")
    print(json.dumps(summarise(parser.parse_args().profile)))


if __name__ == "__main__":
    main()
