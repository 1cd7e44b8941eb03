"""Near-duplicate detection's cost: the cold data stage with it against the same stage without it.

On generated pets the size of Oxford-IIIT Pet, each side labels the images, cleans them into an empty presize cache
(decoding and presizing every original) and splits them; the side with detection also takes each image's perceptual
hash while cleaning decodes it, groups the hashes within the default distance and splits by group. The sides run
alternately, `--rounds` times each, and the ratio of their median seconds must stay at most 1.10 (issue 21). The
Prefect flow's own costs (download, summary, task bookkeeping) are the same on both sides and left out, so the ratio
is the larger one a whole flow run would show.

    python -m bench.duplicates                             # 37 breeds x 200 generated pictures (Pets has 7,390)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import BENCH_DIR, emit, generated_pets, rounded
from lib.data import duplicates
from lib.data.cleaning import clean_images
from lib.data.labelling import label_images
from lib.data.presize import PresizeCache
from lib.data.splitting import split_manifest
from lib.recipe import DEFAULT_DUPLICATE_DISTANCE, DEFAULT_PRESIZE

TARGET_RATIO = 1.10  # issue 21: the data stage gets at most 10% slower


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breeds", type=int, default=37, help="generated breeds (the real dataset has 37)")
    parser.add_argument("--per-breed", type=int, default=200, help="generated pictures per breed")
    parser.add_argument("--presize", type=int, default=DEFAULT_PRESIZE, help="presize cache side in pixels")
    parser.add_argument("--rounds", type=int, default=2, help="cold runs of each side, alternating")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR, help="where generated images live")
    args = parser.parse_args(argv)
    images = generated_pets(args.data_dir, breeds=args.breeds, per_breed=args.per_breed)
    manifest = label_images(images).manifest
    seconds: dict[bool, list[float]] = {False: [], True: []}
    found: dict = {}
    with tempfile.TemporaryDirectory(dir=args.data_dir) as scratch:
        for round_number in range(args.rounds):
            for detect in (False, True):
                cache_dir = Path(scratch) / f"cache-{round_number}-{int(detect)}"  # empty: every image is decoded
                started = time.perf_counter()
                result = _data_stage(manifest, cache_dir, args.presize, detect)
                seconds[detect].append(time.perf_counter() - started)
                found = result or found
    without, with_detection = (statistics.median(seconds[side]) for side in (False, True))
    ratio = with_detection / without
    figures = {
        "images": len(manifest),
        "presize": args.presize,
        "distance": DEFAULT_DUPLICATE_DISTANCE,
        "rounds": args.rounds,
        "without_seconds": without,
        "with_seconds": with_detection,
        "ratio": ratio,
        **found,
    }
    return emit(
        "duplicates", torch.device("cpu"), rounded(figures), {f"ratio_at_most_{TARGET_RATIO}": ratio <= TARGET_RATIO}
    )


def _data_stage(manifest, cache_dir: Path, presize: int, detect: bool) -> dict | None:
    """Clean (presizing into cache_dir) and split; with detect, hash, group and split by group. Return the counts."""
    memo = duplicates.PerceptualHashes(duplicates.memo_path(cache_dir)) if detect else None
    kept = clean_images(manifest, presize_cache=PresizeCache(cache_dir, presize), hashes=memo, progress=False).kept
    if not detect:
        split_manifest(kept)
        return None
    hashes = duplicates.hashes_for(kept, duplicates.PerceptualHashes(duplicates.memo_path(cache_dir)))
    report = duplicates.choose_rows(
        duplicates.find_groups(kept, hashes, DEFAULT_DUPLICATE_DISTANCE), exclude_conflicting=False
    )
    split_manifest(report.used)
    return report.counts()


if __name__ == "__main__":
    main()
