import math
import sys
from pathlib import Path

import pytest
import torch

from lib.train.checkpoint import LAST_CHECKPOINT, CheckpointMismatchError
from lib.train.lr_finder import lr_find
from lib.train.model import create_model, parameter_groups
from lib.train.schedule import OneCycle, group_lrs, lr_finder_lr
from lib.train.trainer import NonFiniteLossError, Trainer, make_optimizer
from tests.support.pets import presized_pets, tiny_trainer

PRESIZE, SIZE, BATCH = 40, 32, 16


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return presized_pets(tmp_path_factory.mktemp("pets"), breeds=4, images_per_breed=32, presize=PRESIZE)


def build(pets, *, seed=0, batch_size=BATCH, **settings):
    return tiny_trainer(pets, presize=PRESIZE, size=SIZE, batch_size=batch_size, seed=seed, **settings)


def weights(trainer):
    return {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}


def test_training_a_tiny_resnet_lowers_the_validation_loss_well_below_chance(pets):
    rows = []
    # Random init and three batches an epoch: a moderate LR keeps BatchNorm statistics from swinging (seeds 0-2 end
    # at 0.08-0.18 against the 0.69 asserted).
    trainer = build(pets, batch_size=32, on_epoch_end=rows.append)
    chance = math.log(len(pets[1]))

    stats = trainer.fit_one_cycle(8, 2e-3)

    assert rows == stats and [row.epoch for row in rows] == list(range(8))
    assert stats[-1].valid_loss < 0.5 * chance
    assert stats[-1].error_rate < 0.25
    assert stats[-1].error_rate == pytest.approx(1 - stats[-1].accuracy)
    assert all(row.images_per_second > 0 and row.seconds > 0 for row in stats)
    # The last row carries the head LR of the last batch, straight from the one-cycle schedule.
    steps = 8 * len(trainer.train_loader)
    lrs, _ = OneCycle(lr_max=group_lrs(2e-3, 3), total_steps=steps).at(steps - 1)
    assert stats[-1].lr == pytest.approx(lrs[-1])
    assert len(trainer.smoothed_losses) == steps and len(trainer.valid_points) == 8


def test_optimizer_is_fastai_adam_with_no_decay_on_norm_and_bias():
    model = create_model("resnet18", 5, pretrained=False)
    optimizer = make_optimizer(model)
    groups = parameter_groups(model)
    assert sorted({group["layer_group"] for group in optimizer.param_groups}) == [0, 1, 2]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(len(g) for g in groups)
    for group in optimizer.param_groups:
        assert group["eps"] == 1e-5 and group["betas"][1] == 0.99
        for param in group["params"]:
            if param.ndim == 1:  # norm weights/biases and biases: fastai wd_bn_bias=False
                assert group["weight_decay"] == 0.0
            else:
                assert group["weight_decay"] == 0.01


def test_adamw_steps_equal_fastai_adam_closed_form_with_changing_lr_and_momentum():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.95, 0.99), eps=1e-5, weight_decay=0.01)
    expected = param.detach().double().clone()
    grad_avg = torch.zeros(5, dtype=torch.float64)
    sqr_avg = torch.zeros(5, dtype=torch.float64)
    for step, (lr, mom) in enumerate([(1e-3, 0.95), (3e-3, 0.9), (2e-3, 0.85)], start=1):
        grad = torch.randn(5)
        param.grad = grad.clone()
        optimizer.param_groups[0].update(lr=lr, betas=(mom, 0.99))
        optimizer.step()
        # fastai Adam (fastai 2.8.12 fastai/optimizer.py): decoupled wd, then moments, then the debiased step.
        expected *= 1 - lr * 0.01
        grad_avg = mom * grad_avg + (1 - mom) * grad.double()
        sqr_avg = 0.99 * sqr_avg + 0.01 * grad.double() ** 2
        expected -= lr / (1 - mom**step) * grad_avg / ((sqr_avg / (1 - 0.99**step)).sqrt() + 1e-5)
        assert torch.allclose(param.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_freeze_and_unfreeze_clear_the_optimizer_state(pets):
    trainer = build(pets)
    trainer.fit_one_cycle(1, 1e-3)
    assert trainer.optimizer.state
    trainer.freeze()
    assert not trainer.optimizer.state
    head = {id(p) for p in parameter_groups(trainer.model)[2]}
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} >= head
    assert all(id(p) in head or p.ndim == 1 for p in trainable)  # the body keeps only its BatchNorm parameters
    trainer.fit_one_cycle(1, 1e-3)
    trainer.unfreeze()
    assert not trainer.optimizer.state and all(p.requires_grad for p in trainer.model.parameters())


def test_fine_tune_trains_the_head_then_everything(pets):
    trainer = build(pets)
    body_before = trainer.model[0][0].weight.detach().clone()
    stats = trainer.fine_tune(1, 1e-2, freeze_epochs=1)
    assert [row.phase for row in stats] == ["frozen", "unfrozen"]
    assert not torch.equal(trainer.model[0][0].weight, body_before)
    assert all(p.requires_grad for p in trainer.model.parameters())
    # The unfrozen phase peaks at base_lr/2 (fastai fine_tune halves it) and ends its one-cycle near lr/div_final.
    steps = len(trainer.train_loader)
    lrs, _ = OneCycle(lr_max=group_lrs(slice(5e-5, 5e-3), 3), total_steps=steps, pct_start=0.3, div=5).at(steps - 1)
    assert stats[-1].lr == pytest.approx(lrs[-1])


def _stop_after(epochs):
    seen = []

    def callback(row):
        seen.append(row)
        if len(seen) == epochs:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize(
    ("method", "arguments", "interrupt_after"),
    [("fit_one_cycle", (3, 5e-3), 1), ("fine_tune", (2, 5e-3), 2)],
)
def test_resuming_a_checkpoint_gives_the_uninterrupted_result(pets, tmp_path, method, arguments, interrupt_after):
    uninterrupted = build(pets)
    expected = getattr(uninterrupted, method)(*arguments)

    interrupted = build(pets, checkpoint_dir=tmp_path, on_epoch_end=_stop_after(interrupt_after))
    with pytest.raises(KeyboardInterrupt):
        getattr(interrupted, method)(*arguments)
    resumed = build(pets, seed=0, checkpoint_dir=tmp_path)  # a fresh process would rebuild it the same way
    rest = getattr(resumed, method)(*arguments, resume_from=tmp_path / LAST_CHECKPOINT)

    assert len(rest) == len(expected) - interrupt_after
    for name, tensor in weights(uninterrupted).items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    keys = ("phase", "epoch", "train_loss", "valid_loss", "error_rate", "lr")
    assert [[getattr(r, k) for k in keys] for r in resumed.history] == [
        [getattr(r, k) for k in keys] for r in uninterrupted.history
    ]


def test_resuming_with_another_plan_is_refused(pets, tmp_path):
    build(pets, checkpoint_dir=tmp_path).fit_one_cycle(1, 1e-3)
    with pytest.raises(CheckpointMismatchError, match="phases"):
        build(pets).fit_one_cycle(2, 1e-3, resume_from=tmp_path / LAST_CHECKPOINT)


def test_resuming_with_other_groups_frozen_is_refused(pets, tmp_path):
    frozen = build(pets, checkpoint_dir=tmp_path)
    frozen.freeze()
    frozen.fit_one_cycle(1, 1e-3)
    with pytest.raises(CheckpointMismatchError, match="frozen"):
        build(pets).fit_one_cycle(1, 1e-3, resume_from=tmp_path / LAST_CHECKPOINT)


def test_a_huge_learning_rate_stops_with_a_clear_error(pets):
    trainer = build(pets)
    with pytest.raises(NonFiniteLossError, match=r"batch \d+/\d+, at learning rate .* LR finder"):
        trainer.fit_one_cycle(3, 1e30)


def test_lr_finder_sweeps_exponentially_and_restores_weights_bit_for_bit(pets):
    trainer = build(pets)
    trainer.fit_one_cycle(1, 1e-3)
    before_weights = weights(trainer)
    before_state = {k: {n: t.clone() for n, t in v.items()} for k, v in trainer.optimizer.state.items()}
    rng = torch.get_rng_state()

    result = lr_find(trainer, num_it=40, end_lr=1.0, methods=("valley", "steep", "minimum", "slide"))

    assert list(result.lrs) == [lr_finder_lr(i, end_lr=1.0, num_it=40) for i in range(len(result.lrs))]
    assert set(result.suggestions) == {"valley", "steep", "minimum", "slide"}
    assert all(result.lrs[0] <= s.point[0] <= result.lrs[-1] for s in result.suggestions.values())
    for name, tensor in weights(trainer).items():
        assert torch.equal(tensor, before_weights[name]), name
    for param, state in trainer.optimizer.state.items():
        assert all(torch.equal(t, before_state[param][n]) for n, t in state.items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_lr_finder_stops_when_the_loss_diverges(pets):
    reports = []

    def report(done: int, total: int) -> None:
        reports.append((done, total))

    result = lr_find(build(pets), num_it=100, start_lr=1e-3, end_lr=1e6, methods=("minimum",), on_progress=report)
    assert result.stopped_early and len(result.lrs) < 100
    assert reports == [(done, 100) for done in range(1, len(result.lrs) + 1)]  # one report per batch swept


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lr_finder_stops_at_a_non_finite_loss_and_suggests_from_the_finite_points(pets, bad):
    trainer = build(pets)
    real_step, losses = trainer.train_step, []

    def step(*args, **kwargs):  # the 40th batch's loss is not finite
        losses.append(real_step(*args, **kwargs))
        return losses[-1] if len(losses) < 40 else torch.tensor(bad)

    trainer.train_step = step
    result = lr_find(trainer, num_it=100, stop_div=False, methods=("valley", "steep", "minimum", "slide"))

    assert result.stopped_early and len(result.lrs) == 40 and not math.isfinite(result.losses[-1])
    assert all(math.isfinite(loss) for loss in result.losses[:-1])
    for suggestion in result.suggestions.values():
        assert math.isfinite(suggestion.lr) and math.isfinite(suggestion.point[1])
        assert result.lrs[10] <= suggestion.point[0] <= result.lrs[-6]  # fastai's trim: first num_it//10, last 5


def test_fp16_request_on_cpu_trains_in_fp32_and_reports_it(pets, recwarn):
    trainer = build(pets, precision="fp16")
    assert trainer.precision.effective == "fp32" and trainer.precision.requested == "fp16"
    assert "fp32" in trainer.precision.note and not [w for w in recwarn.list if "fp16" in str(w.message)]


def test_trainer_accepts_a_model_and_loaders_directly(pets):
    trainer = build(pets)
    direct = Trainer(
        create_model("resnet18", len(pets[1]), pretrained=False),
        trainer.train_loader,
        trainer.valid_loader,
        vocab=pets[1],
        augmentation=trainer.augmentation,
        progress=False,
    )
    assert direct.device.type == "cpu" and direct.vocab == pets[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_training_on_cuda_uses_autocast_a_scaler_and_channels_last(pets):
    trainer = build(pets, device="cuda", precision="fp16")
    assert trainer.precision.effective == "fp16" and trainer.channels_last
    assert trainer.model[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    stats = trainer.fit_one_cycle(2, 2e-3)
    assert all(math.isfinite(row.train_loss) for row in stats)
    assert next(trainer.model.parameters()).dtype == torch.float32  # weights stay fp32 (fastai to_fp16)


def _epoch(phase, epoch, error_rate, valid_loss=1.0):
    from lib.train.trainer import EpochStats

    return EpochStats(phase, epoch, 4, 1.0, 1.0, valid_loss, error_rate, 1 - error_rate, 1.0, 1.0, 1e-3)


def test_best_epoch_counts_unfrozen_epochs_up_to_the_lowest_error_with_ties_broken_by_loss_then_length():
    from lib.train.trainer import best_epoch

    frozen = [_epoch("frozen", 0, 0.01)]  # a better frozen epoch does not count: the retrain length is unfrozen
    assert best_epoch(frozen + [_epoch("unfrozen", e, r) for e, r in enumerate([0.3, 0.1, 0.2, 0.1])]) == 2
    tied = [_epoch("unfrozen", 0, 0.1, 0.5), _epoch("unfrozen", 1, 0.1, 0.4), _epoch("unfrozen", 2, 0.1, 0.4)]
    assert best_epoch(tied) == 2
    with pytest.raises(ValueError, match="no 'unfrozen' epochs"):
        best_epoch(frozen)


def test_training_reads_losses_back_in_chunks_not_once_per_batch(pets, monkeypatch):
    from lib.train.trainer import LOSS_READBACK_BATCHES

    trainer = build(pets)
    calls = {"readback": 0}
    project = str(Path(__file__).resolve().parents[2] / "lib" / "train")  # the loop's; the sampler's are CPU lists

    def counting(real):
        def readback(self):
            if sys._getframe(1).f_code.co_filename.startswith(project):  # torch's own CPU AdamW reads its step count
                calls["readback"] += 1
            return real(self)

        return readback

    for name in ("item", "tolist"):  # each reads a tensor back to the host: on a GPU, a sync
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    row = trainer.fit_one_cycle(1, 1e-3)[0]
    batches = len(trainer.train_loader)
    assert batches > 2
    # One read-back per chunk of training losses and one for the validation sums; none per training batch.
    assert calls["readback"] == math.ceil(batches / LOSS_READBACK_BATCHES) + 1
    assert len(trainer.smoothed_losses) == len(trainer.train_loader)  # every loss still reached the smoother
    assert math.isfinite(row.train_loss) and row.train_loss_mean > 0


def test_a_non_finite_loss_is_reported_at_its_own_batch_even_when_read_back_later():
    from lib.train.lr_finder import SmoothedLoss
    from lib.train.trainer import LossReadback

    smoothed = []
    losses = LossReadback(SmoothedLoss(), smoothed, every=8)
    for value, lrs in ((1.0, [0.1]), (2.0, [0.2]), (float("nan"), [0.3]), (3.0, [0.4])):
        losses.add(torch.tensor(value), lrs)
    value, batches_before_end, lrs = losses.read()
    assert math.isnan(value) and batches_before_end == 1 and lrs == [0.3]
    assert len(smoothed) == 2 and losses.total == 3.0


def test_the_compile_switch_compiles_the_model_and_changes_no_result(pets, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **options):  # the eager backend: dynamo's tracing without a minute of codegen
        compiled.append(model)
        return real_compile(model, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain = build(pets).fit_one_cycle(1, 1e-3)[0]
    trainer = build(pets, compile=True)
    assert compiled == [trainer.model] and trainer.compiled
    fast = trainer.fit_one_cycle(1, 1e-3)[0]
    assert fast.valid_loss == pytest.approx(plain.valid_loss, rel=1e-4)
    assert fast.train_loss == pytest.approx(plain.train_loss, rel=1e-4)


def test_the_shortest_lr_sweep_fastai_allows_gives_a_suggestion(pets):
    result = lr_find(build(pets), num_it=6, stop_div=False)  # fastai's floor: 6 iterations, one point after trimming
    assert len(result.lrs) == 6 and result.suggestions["valley"].lr == result.lrs[0]
