"""The fastai vision_learner model in plain PyTorch: a torchvision resnet body, fastai's head, groups and freezing.

The model is `nn.Sequential(body, head)`, as fastai builds it, so the splitter and freezing below follow fastai:
three parameter groups (stem..layer2, layer3..layer4, head); frozen groups keep their normalisation parameters
trainable (train_bn). The model stays in train() mode while training, so frozen BatchNorm running statistics keep
updating as in fastai; nothing here switches layers to eval().
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
import torchvision
from torch import nn

from lib.recipe import ARCHITECTURES
from lib.train.weights import load_pretrained

# Channels layer4 puts out: BasicBlock resnets 512, Bottleneck resnets 512 * expansion 4.
_BODY_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
# fastai resnet model_meta: cut=-2 drops avgpool and fc.
_BODY_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# fastai _resnet_split: body[:6] (stem, layer1, layer2) | body[6:] (layer3, layer4) | head.
_SPLIT_AT = 6
HEAD_BN_BIAS = 1e-3  # fastai BatchNorm factory: bias filled with 1e-3, weight with 1
_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)


class AdaptiveConcatPool2d(nn.Module):
    """Concatenate adaptive max pooling and adaptive average pooling, max first (fastai's order)."""

    def __init__(self, output_size: int = 1) -> None:
        super().__init__()
        self.max_pool = nn.AdaptiveMaxPool2d(output_size)
        self.avg_pool = nn.AdaptiveAvgPool2d(output_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return max- and average-pooled features stacked along the channel axis."""
        return torch.cat([self.max_pool(features), self.avg_pool(features)], dim=1)


def body_features(arch: str) -> int:
    """Return the number of channels the body of arch puts out."""
    _check_arch(arch)
    return _BODY_FEATURES[arch]


def create_body(
    arch: str, *, state_dict: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None
) -> nn.Sequential:
    """Build a resnet body (conv1 .. layer4), randomly initialised as torchvision does, then load state_dict.

    Args:
        arch: One of ARCHITECTURES.
        state_dict: A torchvision-format resnet state dict; its fc.* entries are ignored.
        generator: Random source for the initialisation; by default seeded from torch's global RNG.
    """
    _check_arch(arch)
    with torch.device("meta"):  # no memory and no draws from the global RNG for torchvision's own init
        resnet = torchvision.models.get_model(arch, weights=None)
    children = OrderedDict((name, module) for name, module in resnet.named_children() if name in _BODY_CHILDREN)
    body = nn.Sequential(children).to_empty(device="cpu")
    _init_body(body, _generator_or_seeded(generator))
    if state_dict is not None:
        _load_body_state(body, state_dict, arch)
    return body


def _init_body(body: nn.Module, generator: torch.Generator) -> None:
    """Initialise like torchvision's ResNet: kaiming-normal convs (fan_out, relu), norm weight 1 and bias 0."""
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()  # to_empty left the buffers uninitialised


def _load_body_state(body: nn.Sequential, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    """Copy a torchvision resnet state dict into body, with a clear error when it does not fit."""
    given = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    expected = set(body.state_dict())
    # Checkpoints saved before BatchNorm counted batches lack num_batches_tracked; the reset value 0 stays.
    missing = sorted(key for key in expected - set(given) if not key.endswith(".num_batches_tracked"))
    unexpected = sorted(set(given) - expected)
    problems = [f"{kind} {_preview(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        raise ValueError(
            f"The state dict does not fit a {arch} body (is it for another architecture, or not in torchvision "
            f"format?): {'; '.join(problems)}"
        )
    try:
        body.load_state_dict(given, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"The state dict does not fit a {arch} body: {exc}") from exc


def create_head(
    n_features: int,
    n_classes: int,
    *,
    hidden: int = 512,
    dropout: float = 0.5,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Build fastai's create_head: concat pool, flatten, then BN-dropout-linear twice with a ReLU between.

    Args:
        n_features: Channels the body puts out; the pooled vector has twice as many.
        n_classes: Number of outputs.
        hidden: Width of the hidden linear layer (fastai lin_ftrs default [512]).
        dropout: Dropout before the last linear; the one before the hidden layer gets half (fastai ps=0.5).
        generator: Random source for the kaiming initialisation; by default seeded from torch's global RNG.
    """
    if n_features < 1 or n_classes < 1 or hidden < 1:
        raise ValueError(f"n_features, n_classes and hidden must be positive, got {n_features}, {n_classes}, {hidden}")
    pooled = 2 * n_features
    with torch.device("meta"):  # PyTorch's default Linear init would draw from the global RNG
        head = nn.Sequential(
            AdaptiveConcatPool2d(1),
            nn.Flatten(),
            nn.BatchNorm1d(pooled),
            nn.Dropout(dropout / 2),
            nn.Linear(pooled, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes, bias=False),
        )
    head.to_empty(device="cpu")
    _init_head(head, _generator_or_seeded(generator))
    return head


def _init_head(head: nn.Sequential, generator: torch.Generator) -> None:
    """Initialise like fastai: kaiming_normal_ (fan_in, gain sqrt 2) on linear weights, BN weight 1 and bias 1e-3."""
    for module in head:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            nn.init.ones_(module.weight)
            nn.init.constant_(module.bias, HEAD_BN_BIAS)
            module.reset_running_stats()  # to_empty left the buffers uninitialised


def create_model(
    arch: str,
    n_classes: int,
    *,
    pretrained: bool | str | Path = True,
    weights_dir: Path | None = None,
    download: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Build `nn.Sequential(body, head)` as fastai's vision_learner does (freezing is left to the caller).

    Args:
        arch: One of ARCHITECTURES.
        n_classes: Number of outputs of the head.
        pretrained: True or "DEFAULT" for torchvision's default weights, a weights name such as "IMAGENET1K_V1",
            a local .pth state dict, or False for random weights.
        weights_dir: Folder of cached checkpoints instead of torch.hub.get_dir()/checkpoints.
        download: Download missing pretrained weights; when False a missing file raises WeightsUnavailableError.
        generator: Random source for the random initialisation; by default seeded from torch's global RNG.
    """
    _check_arch(arch)
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    generator = _generator_or_seeded(generator)
    state_dict = load_pretrained(arch, pretrained, download=download, weights_dir=weights_dir)
    body = create_body(arch, state_dict=state_dict, generator=generator)
    head = create_head(body_features(arch), n_classes, generator=generator)
    return nn.Sequential(body, head)


def parameter_groups(model: nn.Sequential) -> list[list[nn.Parameter]]:
    """Split the model's parameters as fastai's _resnet_split does: stem..layer2, layer3..layer4, head."""
    body, head = _body_and_head(model)
    return [list(body[:_SPLIT_AT].parameters()), list(body[_SPLIT_AT:].parameters()), list(head.parameters())]


def is_norm_parameter_owner(module: nn.Module) -> bool:
    """Tell whether module is a normalisation layer, whose parameters train when frozen and never decay."""
    return isinstance(module, _NORM_TYPES)


def norm_parameters(model: nn.Module) -> set[int]:
    """Return the ids of the parameters that normalisation layers own directly."""
    return {
        id(parameter)
        for module in model.modules()
        if is_norm_parameter_owner(module)
        for parameter in module.parameters(recurse=False)
    }


def no_weight_decay(model: nn.Module) -> set[int]:
    """Return the ids of the parameters that get no weight decay: norm parameters and biases (fastai wd_bn_bias)."""
    biases = {id(parameter) for name, parameter in model.named_parameters() if name.rpartition(".")[2] == "bias"}
    return norm_parameters(model) | biases


def freeze_to(model: nn.Sequential, n: int, *, train_bn: bool = True) -> None:
    """Freeze parameter groups [0, n) as fastai's freeze_to does; negative n counts from the end.

    Args:
        model: A model from create_model.
        n: Number of leading groups to freeze; -1 freezes all but the head, 0 unfreezes everything.
        train_bn: Keep normalisation-layer parameters trainable in frozen groups (fastai train_bn).
    """
    groups = parameter_groups(model)
    if not -len(groups) <= n <= len(groups):
        raise ValueError(f"Cannot freeze to {n}: the model has {len(groups)} parameter groups")
    frozen_count = n if n >= 0 else len(groups) + n
    still_trained = norm_parameters(model) if train_bn else set()
    for index, group in enumerate(groups):
        for parameter in group:
            parameter.requires_grad_(index >= frozen_count or id(parameter) in still_trained)


def freeze(model: nn.Sequential, *, train_bn: bool = True) -> None:
    """Freeze every group but the head (fastai freeze() == freeze_to(-1))."""
    freeze_to(model, -1, train_bn=train_bn)


def unfreeze(model: nn.Sequential) -> None:
    """Make every parameter trainable (fastai unfreeze() == freeze_to(0))."""
    freeze_to(model, 0)


def count_parameters(params: Iterable[nn.Parameter] | nn.Module, *, trainable_only: bool = False) -> int:
    """Return the number of scalars in params (a module or an iterable of parameters)."""
    parameters = params.parameters() if isinstance(params, nn.Module) else params
    return sum(parameter.numel() for parameter in parameters if parameter.requires_grad or not trainable_only)


def _body_and_head(model: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """Return the body and head of a create_model model, or say what is wrong with it."""
    is_model = isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], nn.Sequential)
    if not is_model or tuple(name for name, _ in model[0].named_children()) != _BODY_CHILDREN:
        raise ValueError(
            f"Expected nn.Sequential(body, head) from create_model with a resnet body {_BODY_CHILDREN}, "
            f"got {type(model).__name__}"
        )
    return model[0], model[1]


def _check_arch(arch: str) -> None:
    """Raise ValueError naming the supported architectures when arch is not one of them."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unsupported architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def _generator_or_seeded(generator: torch.Generator | None) -> torch.Generator:
    """Return generator, or a new one seeded by one draw from torch's global RNG so torch.manual_seed still works."""
    if generator is not None:
        return generator
    # One draw keeps the PyTorch convention (torch.manual_seed makes model init reproducible, successive models
    # differ); callers that must leave the global RNG alone pass their own generator.
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


def _preview(keys: list[str], limit: int = 5) -> str:
    """Return up to limit keys and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"
