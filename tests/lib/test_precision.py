import pytest
import torch

from lib.train.precision import resolve_precision, use_channels_last


def test_fp16_on_cpu_falls_back_to_fp32_and_says_why_without_a_warning(recwarn):
    precision = resolve_precision("fp16", "cpu")  # fp16 is the recipe's default: no warning in every CPU stage
    assert (precision.requested, precision.effective) == ("fp16", "fp32") and not recwarn.list
    assert precision.note == "fp16 mixed precision needs a CUDA GPU, so this runs in fp32 on cpu."
    assert precision.autocast_dtype is None and not precision.uses_grad_scaler
    assert not precision.grad_scaler().is_enabled()
    with precision.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bf16_on_cpu_autocasts_matmuls_without_a_scaler(recwarn):
    precision = resolve_precision("bf16", "cpu")
    assert precision.effective == "bf16" and not recwarn.list
    assert not precision.grad_scaler().is_enabled()
    with precision.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_fp32_is_plain_and_unknown_precisions_are_refused():
    assert resolve_precision("fp32", "cpu").effective == "fp32"
    with pytest.raises(ValueError, match="choose one of fp32, fp16, bf16"):
        resolve_precision("half", "cpu")


def test_channels_last_is_the_default_on_cuda_and_cpu_unless_asked_otherwise():
    assert use_channels_last("cuda") and use_channels_last("cpu") and not use_channels_last("mps")
    assert use_channels_last("mps", True) and not use_channels_last("cpu", False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_scales_the_loss_and_skips_overflowing_steps():
    precision = resolve_precision("fp16", "cuda")
    assert precision.effective == "fp16" and precision.uses_grad_scaler
    layer = torch.nn.Linear(4, 2).cuda()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = precision.grad_scaler()
    with precision.autocast():
        out = layer(torch.ones(3, 4, device="cuda"))
    assert out.dtype == torch.float16
    before = layer.weight.detach().clone()
    scaler.scale(out.float().sum() * float("inf")).backward()  # every gradient overflows
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(layer.weight, before)  # the step was skipped
    assert scaler.get_scale() == 2.0**15  # torch default init 2**16, backoff x0.5
