"""The benchmarks run end to end on tiny settings and print one JSON line whose figures agree with each other.

These check that `make bench` works and reports what BENCHMARKS.md says; the speed targets themselves are met (or
not) by the benchmarks on full settings, never by timed unit tests.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--breeds", "2", "--per-breed", "12", "--size", "32", "--presize", "48", "--bs", "4"]


def run_bench(module: str, *arguments: str, data_dir: Path, timeout: int = 300) -> dict:
    environment = {**os.environ, "PETS_BENCH_DIR": str(data_dir), "DO_NOT_TRACK": "1"}
    environment.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must hold one JSON line, got: {done.stdout[-2000:]}"
    record = json.loads(lines[0])
    assert record["benchmark"] == module and record["machine"]["cpus"] >= 1
    assert record["met"] == all(record["targets"].values())
    return record


@pytest.mark.slow  # a benchmark end to end in its own process: CI runs it (make test-slow)
def test_train_throughput_reports_the_ratio_of_its_own_medians(tmp_path):
    record = run_bench("train_throughput", *TINY, "--repeats", "1", data_dir=tmp_path)
    ratio = record["project_images_per_second"] / record["model_only_channels_last_images_per_second"]
    assert record["ratio_to_model_only"] == pytest.approx(ratio, rel=0.01)
    assert record["batches_per_epoch"] == 20 // 4  # 24 images, int(0.2 * 24) = 4 held out, drop_last batches of 4
    assert record["targets"] == {"ratio_at_least_0.85": record["ratio_to_model_only"] >= 0.85}


@pytest.mark.slow  # a benchmark end to end in its own process: CI runs it (make test-slow)
def test_data_pipeline_compares_the_warm_loader_with_the_model(tmp_path):
    record = run_bench("data_pipeline", *TINY, "--epochs", "1", data_dir=tmp_path)
    assert record["images"] == 24 and record["workers"] == 0  # two CPUs: no loader workers on the CPU
    assert record["warm_to_model"] == pytest.approx(
        record["warm_images_per_second"] / record["model_images_per_second"], rel=0.01
    )
    assert record["cold_presize_images_per_second"] > 0


@pytest.mark.slow  # a benchmark end to end in its own process: CI runs it (make test-slow)
def test_memory_records_rss_after_every_epoch(tmp_path):
    record = run_bench("memory", *TINY, "--epochs", "3", data_dir=tmp_path)
    after = record["rss_after_epoch_mb"]
    assert len(after) == 3 and record["peak_rss_mb"] >= max(after) - 1
    assert record["growth_after_first_epoch_mb"] == pytest.approx(after[-1] - after[0], abs=0.2)


@pytest.mark.slow  # a benchmark end to end in its own process: CI runs it (make test-slow)
def test_warm_rerun_fetches_and_decodes_nothing_the_second_time(tmp_path):
    record = run_bench("warm_rerun", "--breeds", "2", "--per-breed", "6", "--presize", "48", data_dir=tmp_path)
    assert record["images"] == 12 and record["http_requests"] == 1
    assert record["cold_decoded"] == 12 and record["warm_decoded"] == 0 and record["warm_presized"] == 0
    assert record["warm_data_stages_seconds"] <= record["warm_flow_seconds"]


@pytest.mark.slow  # a benchmark end to end in its own process: CI runs it (make test-slow)
@pytest.mark.timeout(300)
def test_duplicates_times_the_data_stage_with_and_without_detection(tmp_path):
    arguments = ["--breeds", "2", "--per-breed", "6", "--presize", "48", "--rounds", "1"]
    record = run_bench("duplicates", *arguments, data_dir=tmp_path)
    assert record["images"] == 12 and record["rounds"] == 1
    assert record["ratio"] == pytest.approx(record["with_seconds"] / record["without_seconds"], rel=0.02)
    assert record["images_in_groups"] >= 2 * record["duplicate_groups"]


@pytest.mark.slow  # a benchmark end to end in its own process: CI runs it (make test-slow)
def test_overhead_splits_a_pets_train_into_phases_that_add_up_to_its_wall_time(tmp_path):
    # One fresh run, one stage (no baseline, no LR finder, no retraining): the cheapest `pets train` there is.
    quick = ["--", "--no-baseline", "--base-lr", "1e-3", "--freeze-epochs", "1", "--epochs", "1", "--bs", "8"]
    record = run_bench("overhead", "--runs", "1", "--breeds", "2", "--per-breed", "12", *quick, data_dir=tmp_path)
    run = record["fresh"]
    assert "repeat" not in record and record["options"].endswith(" ".join(quick[1:]))
    assert run["training_seconds"] > 0 and "baseline_start_to_first_epoch" not in run and "lr_finder" not in run
    assert run["fixed_seconds"] == pytest.approx(run["wall_seconds"] - run["training_seconds"], abs=0.01)
    phases = {key: value for key, value in run.items() if key not in ("wall_seconds", "fixed_seconds", "cpu_seconds")}
    assert sum(phases.values()) == pytest.approx(run["wall_seconds"], abs=0.02)  # `other` is what no phase covers
    assert all(value >= 0 for key, value in phases.items() if key != "other")
    assert run["probe_start_to_first_epoch"] < run["wall_seconds"] and run["cpu_seconds"] > 0
    assert record["fixed_seconds"] == run["fixed_seconds"] and record["targets"] == {
        "fixed_at_most_15_s": run["fixed_seconds"] <= 15
    }


@pytest.mark.skipif(importlib.util.find_spec("fastai") is None, reason="fastai is the optional `bench` extra")
def test_vs_fastai_runs_both_sides_on_the_same_images(tmp_path):
    record = run_bench("vs_fastai", "--quick", data_dir=tmp_path)
    assert record["train_speedup"] == pytest.approx(
        record["project_train_images_per_second"] / record["fastai_train_images_per_second"], rel=0.01
    )
    assert record["fastai_version"] == "2.8.12"


@pytest.mark.slow  # registers a model and starts the real server: ~40 s
def test_serving_reports_the_latency_percentiles_of_answered_requests(tmp_path):
    record = run_bench(
        "serving", "--arch", "resnet18", "--presize", "48", "--size", "32", "--requests", "5", data_dir=tmp_path
    )
    assert record["failed_requests"] == 0 and record["requests"] == 5
    assert 0 < record["served_p50_ms"] <= record["served_p95_ms"]
    assert record["server_overhead"] == pytest.approx(record["served_p50_ms"] / record["pyfunc_p50_ms"], rel=0.02)


@pytest.mark.slow  # it logs and registers a model first (~15 s on 2 CPUs): beyond the budget of `make test`
def test_predict_images_reports_the_ratio_of_its_medians_and_both_sides_agree(tmp_path):
    record = run_bench("predict_images", *TINY, "--images", "12", "--repeats", "1", data_dir=tmp_path)
    assert record["images"] == 12 and record["precision"] == "fp32"
    assert record["batched_to_loop"] == pytest.approx(
        record["batched_images_per_second"] / record["loop_images_per_second"], rel=0.01
    )
    assert record["max_probability_difference"] < 1e-5  # the same network on the same pictures
    assert record["targets"] == {"ratio_at_least_5": record["batched_to_loop"] >= 5}


@pytest.mark.slow  # two torchrun ranks and two spawned gloo processes: CI runs it (make test-slow)
def test_data_parallel_compares_two_gloo_ranks_with_one_process_and_sizes_the_all_reduce(tmp_path):
    record = run_bench("data_parallel", *TINY, "--epochs", "1", data_dir=tmp_path)
    assert record["two_ranks_to_one_process"] == pytest.approx(
        record["two_ranks_images_per_second"] / record["one_process_images_per_second"], rel=0.01
    )
    share = record["gloo_all_reduce_milliseconds"] / (
        record["gloo_all_reduce_milliseconds"] + record["rank_forward_backward_milliseconds"]
    )
    assert record["all_reduce_share_of_step"] == pytest.approx(share, abs=0.002)
    for arch in ("resnet50", "resnet101"):
        volume = record["ring_all_reduce_per_gpu"][arch]
        assert volume["parameters_millions"] == pytest.approx(body_and_head_parameters(arch, classes=2) / 1e6, abs=1e-3)
        assert volume["gradient_megabytes"] == pytest.approx(4 * volume["parameters_millions"], rel=0.01)
        # a ring all-reduce over 8 GPUs sends 2 * 7/8 of the gradients from each GPU
        assert volume["sent_megabytes_per_gpu_8_gpus"] == pytest.approx(1.75 * volume["gradient_megabytes"], rel=0.01)
        assert volume["nvlink4_milliseconds"] < volume["pcie5_x16_milliseconds"]


def body_and_head_parameters(arch: str, classes: int) -> int:
    """torchvision's network without its fc, plus fastai's head on its 2048 features, counted by hand: BatchNorm1d
    over the 4096 concatenated pooled features, Linear(4096, 512) and BatchNorm1d(512), Linear(512, classes), the
    linear layers without bias as they follow a BatchNorm (fastai vision/learner.py `create_head`)."""
    import torchvision

    network = getattr(torchvision.models, arch)()
    body = sum(p.numel() for p in network.parameters()) - sum(p.numel() for p in network.fc.parameters())
    return body + 2 * 4096 + 4096 * 512 + 2 * 512 + 512 * classes
