"""The fastai vision_learner model: head layout and init, resnet body, parameter groups, freezing, weight decay."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from lib.train.model import (
    ARCHITECTURES,
    AdaptiveConcatPool2d,
    body_features,
    count_parameters,
    create_body,
    create_head,
    create_model,
    freeze,
    freeze_to,
    no_weight_decay,
    norm_parameters,
    parameter_groups,
    unfreeze,
)

BODY_CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_torchvision_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a torchvision-format state dict (fc included) filled with seeded random numbers."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(arch, weights=None)
    generator = seeded(seed)
    return {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else torch.zeros_like(value)
        for key, value in reference.to_empty(device="cpu").state_dict().items()
    }


@pytest.fixture(scope="module")
def resnet34_model() -> nn.Sequential:
    return create_model("resnet34", 6, pretrained=False, generator=seeded())


def test_head_has_fastai_layout():
    head = create_head(512, 37, generator=seeded())
    assert [type(module) for module in head] == [
        AdaptiveConcatPool2d,
        nn.Flatten,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
    ]
    pool, _, first_norm, first_dropout, hidden, relu, second_norm, last_dropout, last = head
    assert (first_dropout.p, last_dropout.p) == (0.25, 0.5)  # fastai ps=0.5: hidden layers ps/2, last ps
    assert (hidden.in_features, hidden.out_features, last.in_features, last.out_features) == (1024, 512, 512, 37)
    assert hidden.bias is None and last.bias is None
    assert (first_norm.num_features, second_norm.num_features) == (1024, 512)
    assert all(norm.momentum == 0.1 and norm.eps == 1e-5 for norm in (first_norm, second_norm))
    assert relu.inplace


def test_head_maps_a_feature_map_to_class_scores():
    head = create_head(8, 3, hidden=16, generator=seeded()).eval()
    assert head(torch.randn(2, 8, 5, 5, generator=seeded())).shape == (2, 3)


def test_concat_pool_puts_max_before_average():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 10.0]], [[-4.0, 0.0], [0.0, 0.0]]]])  # 1 x 2 channels x 2 x 2
    pooled = AdaptiveConcatPool2d(1)(features).flatten()
    assert pooled.tolist() == [10.0, 0.0, 4.0, -1.0]  # max of channels 0, 1, then their means


def test_head_norm_layers_start_at_weight_one_bias_1e_3():
    head = create_head(512, 37, generator=seeded())
    for norm in (head[2], head[6]):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.allclose(norm.bias, torch.full_like(norm.bias, 1e-3))  # fastai BatchNorm factory
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))


def test_head_linear_weights_are_kaiming_normal_fan_in():
    head = create_head(512, 37, generator=seeded())
    hidden, last = head[4].weight.detach(), head[8].weight.detach()
    # 524,288 draws: the relative standard error of the std is 1/sqrt(2n) ~ 0.1 %, so 2 % is far outside chance.
    assert hidden.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.02)
    assert abs(hidden.mean().item()) < 1e-3
    assert last.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)  # 18,944 draws, 0.5 % standard error


def test_head_rejects_nonsense_sizes():
    with pytest.raises(ValueError, match="positive"):
        create_head(512, 0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_body_is_resnet_up_to_layer4(arch):
    body = create_body(arch, generator=seeded()).eval()
    assert [name for name, _ in body.named_children()] == BODY_CHILDREN
    with torch.no_grad():
        features = body(torch.randn(1, 3, 64, 64, generator=seeded()))
    assert features.shape == (1, body_features(arch), 2, 2)  # resnets downsample by 32


def test_body_features_per_architecture():
    assert [body_features(arch) for arch in ARCHITECTURES] == [512, 512, 2048, 2048, 2048]


def test_body_init_follows_torchvision_kaiming_fan_out():
    body = create_body("resnet34", generator=seeded())
    fan_out = 64 * 7 * 7
    assert body.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert torch.equal(body.bn1.weight, torch.ones(64)) and torch.equal(body.bn1.bias, torch.zeros(64))
    assert torch.equal(body.bn1.running_var, torch.ones(64)) and body.bn1.num_batches_tracked.item() == 0


def test_body_loads_a_torchvision_state_dict_ignoring_fc():
    state_dict = random_torchvision_state_dict("resnet18")
    body = create_body("resnet18", state_dict=state_dict)
    loaded = body.state_dict()
    assert set(loaded) == {key for key in state_dict if not key.startswith("fc.")}
    assert all(torch.equal(loaded[key], state_dict[key]) for key in loaded)


def test_body_accepts_checkpoints_without_batch_counters():
    state_dict = {k: v for k, v in random_torchvision_state_dict("resnet18").items() if "num_batches" not in k}
    body = create_body("resnet18", state_dict=state_dict)
    assert torch.equal(body.layer1[0].bn1.weight, state_dict["layer1.0.bn1.weight"])
    assert body.bn1.num_batches_tracked.item() == 0


def test_body_rejects_a_state_dict_of_another_architecture():
    with pytest.raises(ValueError, match=r"resnet18 body.*unexpected layer1\.0\.bn3"):
        create_body("resnet18", state_dict=random_torchvision_state_dict("resnet50"))


def test_body_rejects_a_state_dict_with_a_missing_key():
    state_dict = random_torchvision_state_dict("resnet18")
    del state_dict["layer2.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"missing layer2\.0\.conv1\.weight"):
        create_body("resnet18", state_dict=state_dict)


def test_create_model_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101, resnet152"):
        create_model("vgg16", 37, pretrained=False)


def test_create_model_is_reproducible_from_its_generator_and_leaves_the_global_rng_alone():
    global_state = torch.random.get_rng_state()
    first = create_model("resnet18", 5, pretrained=False, generator=seeded(1))
    second = create_model("resnet18", 5, pretrained=False, generator=seeded(1))
    other = create_model("resnet18", 5, pretrained=False, generator=seeded(2))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    assert not torch.equal(first[1][4].weight, other[1][4].weight)
    assert not torch.equal(first[0].conv1.weight, other[0].conv1.weight)


def test_without_a_generator_torch_manual_seed_makes_the_model_reproducible():
    with torch.random.fork_rng():
        torch.manual_seed(7)
        first = create_model("resnet18", 5, pretrained=False)
        following = create_model("resnet18", 5, pretrained=False)
        torch.manual_seed(7)
        again = create_model("resnet18", 5, pretrained=False)
    assert torch.equal(first[0].conv1.weight, again[0].conv1.weight)
    assert torch.equal(first[1][8].weight, again[1][8].weight)
    assert not torch.equal(first[0].conv1.weight, following[0].conv1.weight)


def test_resnet34_groups_match_fastai_measurement(resnet34_model):
    groups = parameter_groups(resnet34_model)
    # Measured on fastai 2.8.12 vision_learner(resnet34) with 6 classes (fastai/vision/learner.py `_resnet_split`).
    assert [(len(group), count_parameters(group)) for group in groups] == [
        (48, 1_347_904),
        (60, 19_936_768),
        (6, 530_432),
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_group_totals_match_torchvision_and_the_head_closed_form(arch):
    n_classes = 37
    with torch.device("meta"):  # an independent count from torchvision's own model
        reference = torchvision.models.get_model(arch, weights=None)
    stem_to_layer2 = [reference.conv1, reference.bn1, reference.layer1, reference.layer2]
    nf = body_features(arch)
    expected = [
        sum(count_parameters(module) for module in stem_to_layer2),
        count_parameters(reference.layer3) + count_parameters(reference.layer4),
        4 * nf + 2 * nf * 512 + 1024 + 512 * n_classes,  # BN(2nf), Linear(2nf,512), BN(512), Linear(512,n)
    ]
    model = create_model(arch, n_classes, pretrained=False, generator=seeded())
    groups = parameter_groups(model)
    assert [count_parameters(group) for group in groups] == expected
    assert sum(len(group) for group in groups) == len(list(model.parameters()))  # every tensor in exactly one group
    assert len({id(p) for group in groups for p in group}) == len(list(model.parameters()))


def trainable_per_group(model: nn.Sequential) -> list[int]:
    return [sum(parameter.requires_grad for parameter in group) for group in parameter_groups(model)]


def test_freeze_keeps_head_and_norm_parameters_trainable(resnet34_model):
    freeze(resnet34_model)
    try:
        norm_ids = norm_parameters(resnet34_model)
        groups = parameter_groups(resnet34_model)
        trainable = {id(p) for p in resnet34_model.parameters() if p.requires_grad}
        assert trainable == norm_ids | {id(p) for p in groups[2]}
        # Measured on fastai 2.8.12 (train_bn=True): frozen groups 0 and 1 keep 32 and 40 trainable BN tensors.
        assert trainable_per_group(resnet34_model) == [32, 40, 6]
        assert not resnet34_model[0].conv1.weight.requires_grad and resnet34_model[0].bn1.weight.requires_grad
    finally:
        unfreeze(resnet34_model)


def test_freeze_without_train_bn_freezes_norm_layers_too(resnet34_model):
    freeze(resnet34_model, train_bn=False)
    try:
        assert trainable_per_group(resnet34_model) == [0, 0, 6]
    finally:
        unfreeze(resnet34_model)


def test_unfreeze_makes_everything_trainable(resnet34_model):
    freeze(resnet34_model)
    unfreeze(resnet34_model)
    assert all(parameter.requires_grad for parameter in resnet34_model.parameters())


def test_freeze_to_counts_groups_like_python_indexing(resnet34_model):
    try:
        freeze_to(resnet34_model, 1)
        assert trainable_per_group(resnet34_model) == [32, 60, 6]
        freeze_to(resnet34_model, -2)
        assert trainable_per_group(resnet34_model) == [32, 60, 6]
        freeze_to(resnet34_model, 3)  # every group frozen: only norm parameters train
        assert trainable_per_group(resnet34_model) == [32, 40, 4]
        with pytest.raises(ValueError, match="Cannot freeze to 4: the model has 3 parameter groups"):
            freeze_to(resnet34_model, 4)
    finally:
        unfreeze(resnet34_model)


def test_frozen_weights_get_no_gradient_but_norm_parameters_do(resnet34_model):
    freeze(resnet34_model)
    try:
        resnet34_model.train()
        resnet34_model(torch.randn(2, 3, 64, 64, generator=seeded())).sum().backward()
        body = resnet34_model[0]
        assert body.layer1[0].conv1.weight.grad is None
        assert body.layer1[0].bn1.weight.grad is not None
        assert resnet34_model[1][4].weight.grad is not None
    finally:
        resnet34_model.zero_grad(set_to_none=True)
        unfreeze(resnet34_model)


def test_no_weight_decay_for_resnet34_is_every_norm_parameter(resnet34_model):
    excluded = no_weight_decay(resnet34_model)
    # The reference's "76 of 114": the model (body + head, fc dropped) has 114 parameter tensors: 36 conv weights,
    # 36 BatchNorm2d layers (72 tensors), 2 head BatchNorm1d (4) and 2 bias-free Linear weights. No conv or linear
    # has a bias, so the 76 without weight decay are exactly the 38 norm layers' weights and biases.
    assert len(list(resnet34_model.parameters())) == 114
    assert len(excluded) == 76
    assert excluded == norm_parameters(resnet34_model)


def test_no_weight_decay_includes_every_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))  # materialise the lazy layer
    conv, norm, _, linear = model
    assert no_weight_decay(model) == {id(conv.bias), id(norm.weight), id(norm.bias), id(linear.bias)}


def test_count_parameters_accepts_modules_and_counts_trainable_only_on_request():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 8
    assert count_parameters(layer.parameters(), trainable_only=True) == 6


def test_parameter_groups_rejects_other_models():
    with pytest.raises(ValueError, match="create_model"):
        parameter_groups(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
