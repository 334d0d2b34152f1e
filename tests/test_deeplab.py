"""LibMTL's NYUv2 / Cityscapes model: the dilated ResNet (``output_stride``, ``dense``) and the DeepLab
ASPP head, checked against torchvision's and LibMTL's dilation rules re-derived here, LibMTL's head
re-counted by formula, and a short training run on a tiny NYUv2-format fixture."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import write_dense_fixture
from mtl_lightning import MultiTaskModule
from mtl_lightning.callbacks import FirstValidationBaselines
from mtl_lightning.data import NYUv2DataModule
from mtl_lightning.models import DeepLabHead, ResNet
from mtl_lightning.models.resnet import DEPTHS
from mtl_lightning.tasks import DepthTask, NormalTask, SegmentationTask, TaskConfigError


def conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def expected_size(size: int, output_stride: int) -> int:
    """The feature map's side: the 7×7/2 stem, the 3×3/2 max-pool, then a 3×3/2 convolution for each
    of layer2…4 whose stride is kept (a dilated 3×3 with padding = dilation keeps the size)."""
    size = conv_out(conv_out(size, 7, 2, 3), 3, 2, 1)
    for _ in range({32: 3, 16: 2, 8: 1}[output_stride]):
        size = conv_out(size, 3, 2, 1)
    return size


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("hw", [(64, 96), (45, 71)])
def test_dense_features_have_the_output_stride(output_stride, hw):
    net = ResNet(50, width=4, output_stride=output_stride, dense=True).eval()
    out = net(torch.randn(2, 3, *hw))
    assert tuple(out.shape) == (2, net.out_features, expected_size(hw[0], output_stride), expected_size(hw[1], output_stride))
    assert net.out_features == 4 * 8 * 4
    if hw == (64, 96):
        assert out.shape[-2:] == (64 // output_stride, 96 // output_stride)
    pooled = ResNet(18, width=4, output_stride=output_stride).eval()
    assert tuple(pooled(torch.randn(2, 3, *hw)).shape) == (2, 32)


def torchvision_dilations(depth: int, output_stride: int) -> dict[str, tuple[int, int, int]]:
    """``{conv name: (stride, dilation, padding)}`` of the strided / 3×3 convolutions as torchvision's
    ``ResNet._make_layer`` sets them with ``replace_stride_with_dilation`` (bottleneck depths)."""
    replace = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
    out: dict[str, tuple[int, int, int]] = {}
    dilation = 1
    for stage, count in enumerate(DEPTHS[depth][1]):
        stride = 1 if stage == 0 else 2
        previous = dilation
        if stage > 0 and replace[stage - 1]:
            dilation *= stride
            stride = 1
        # first block: Bottleneck(inplanes, planes, stride, downsample, groups, base_width, previous_dilation)
        out[f"layer{stage + 1}.0.conv2"] = (stride, previous, previous)
        out[f"layer{stage + 1}.0.downsample.0"] = (stride, 1, 0)
        for block in range(1, count):
            out[f"layer{stage + 1}.{block}.conv2"] = (1, dilation, dilation)
    return out


def libmtl_dilated(net: nn.Module, output_stride: int) -> nn.Module:
    """LibMTL's ``ResnetDilated._nostride_dilate`` applied to a plain ResNet (LibMTL/model/resnet_dilated.py)."""

    def nostride_dilate(m: nn.Module, dilate: int) -> None:
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation, m.padding = (dilate // 2, dilate // 2), (dilate // 2, dilate // 2)
            elif m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilate, dilate), (dilate, dilate)

    if output_stride == 8:
        net.layer3.apply(partial(nostride_dilate, dilate=2))
        net.layer4.apply(partial(nostride_dilate, dilate=4))
    elif output_stride == 16:
        net.layer4.apply(partial(nostride_dilate, dilate=2))
    return net


def convs(net: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {n: (m.stride[0], m.dilation[0], m.padding[0]) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_dilation_follows_torchvision_and_libmtl(output_stride):
    ours = convs(ResNet(50, width=4, output_stride=output_stride))
    for name, expected in torchvision_dilations(50, output_stride).items():
        assert ours[name] == expected, name
    for depth in (18, 50):  # LibMTL's rule also covers the basic blocks (torchvision refuses to dilate them)
        assert convs(ResNet(depth, width=4, output_stride=output_stride)) == convs(
            libmtl_dilated(ResNet(depth, width=4), output_stride))
    if output_stride == 8:
        assert ours["layer4.2.conv2"] == (1, 4, 4) and ours["layer3.0.conv2"] == (1, 1, 1)
        assert ours["layer3.1.conv2"] == (1, 2, 2) and ours["layer4.0.conv2"] == (1, 2, 2)


def test_torchvision_named_weights_load_into_the_dilated_resnet(tmp_path):
    torch.manual_seed(0)
    plain = ResNet(50, width=4)
    state = {k: v for k, v in plain.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 128), torch.zeros(10)  # a classifier, ignored
    torch.save(state, tmp_path / "r50.pth")
    dilated = ResNet(50, weights=str(tmp_path / "r50.pth"), width=4, output_stride=8, dense=True).eval()
    assert all(torch.equal(v, dilated.state_dict()[k]) for k, v in plain.state_dict().items())
    # the same weights in LibMTL's dilated network (its forward: stem, max-pool, layer1…4) give the same map
    reference = libmtl_dilated(plain, 8).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
        assert torch.allclose(dilated(x), expected, atol=1e-6)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="output_stride must be one of"):
        ResNet(50, output_stride=4)
    with pytest.raises(ValueError, match="hidden_features"):
        ResNet(18, dense=True, hidden_features=8)
    with pytest.raises(TaskConfigError, match="'seg'.*head_type"):
        SegmentationTask("seg", num_classes=3, head_type="aspp")
    with pytest.raises(TaskConfigError, match="'d'.*head_upsample"):
        DepthTask("d", head_upsample=0)
    with pytest.raises(ValueError, match="DeepLabHead"):
        DeepLabHead(8, 3, atrous_rates=())


def aspp_head_parameters(c: int, k: int, width: int = 256, rates: int = 3) -> int:
    """LibMTL's DeepLabHead(c, k) (examples/nyu/aspp.py), counted layer by layer: bias-free convolutions,
    BatchNorm (weight, bias) after each, a biased final 1×1 convolution."""
    bn = 2 * width
    aspp = (c * width + bn) + rates * (9 * c * width + bn) + (c * width + bn) + ((rates + 2) * width * width + bn)
    return aspp + 9 * width * width + bn + width * k + k


def test_deeplab_head_is_libmtls():
    head = DeepLabHead(2048, 13)
    assert sum(p.numel() for p in head.parameters()) == aspp_head_parameters(2048, 13) == 16_128_781
    names = [n for n, _ in head.named_parameters()]
    # LibMTL's module names: ASPP (convs 0-4, project), conv 3×3, BN, ReLU, conv 1×1
    assert names[:3] == ["0.convs.0.0.weight", "0.convs.0.1.weight", "0.convs.0.1.bias"]
    assert {"0.convs.3.0.weight", "0.convs.4.1.weight", "0.project.0.weight", "1.weight", "2.weight", "4.weight",
            "4.bias"} <= set(names)
    dilations = [m.dilation[0] for m in head[0].convs[1:4].modules() if isinstance(m, nn.Conv2d)]
    assert dilations == [12, 24, 36] and head[0].project[3].p == 0.5
    # the whole NYUv2 model: torchvision's ResNet-50 (25,557,032 with its fc of 2,049,000) and three heads
    model = MultiTaskModule(ResNet(50, output_stride=8, dense=True), [
        SegmentationTask("segmentation", num_classes=13, head_type="deeplab", head_upsample=8),
        DepthTask("depth", head_type="deeplab", head_upsample=8), NormalTask("normal", head_type="deeplab", head_upsample=8)])
    expected = 25_557_032 - 2_049_000 + sum(aspp_head_parameters(2048, k) for k in (13, 1, 3))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_head_upsamples_as_libmtl_process_preds():
    torch.manual_seed(0)
    head = DeepLabHead(16, 3, channels=8, upsample=8).eval()
    plain = DeepLabHead(16, 3, channels=8).eval()
    plain.load_state_dict(head.state_dict())
    x = torch.randn(2, 16, 9, 12)  # the features of a 72×96 image at output stride 8
    with torch.no_grad():
        out = head(x)
        expected = F.interpolate(plain(x), (72, 96), mode="bilinear", align_corners=True)  # LibMTL: the image size
    assert torch.allclose(out, expected, atol=1e-6)
    pool = head[0].convs[4]
    with torch.no_grad():  # the image-pooling branch is constant over the map
        pooled = pool(x)
    assert torch.allclose(pooled, pooled[:, :, :1, :1].expand_as(pooled))


def test_deeplab_model_learns_on_a_nyuv2_fixture(tmp_path: Path):
    torch.manual_seed(0)
    root = write_dense_fixture(tmp_path)
    dm = NYUv2DataModule(str(root), batch_size=6, augmentation=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    head = partial(DeepLabHead, 128, channels=16, upsample=8)  # LibMTL's head, narrowed (256 channels) for speed
    tasks = [SegmentationTask("segmentation", num_classes=13, head=head(13)), DepthTask("depth", head=head(1)),
             NormalTask("normal", head=head(3))]
    model = MultiTaskModule(ResNet(50, width=4, output_stride=8, dense=True), tasks)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        outputs = model(batch["input"])
        return sum(model.tasks[n].loss(outputs[n], batch[n]) for n in outputs)  # type: ignore[return-value]

    with torch.no_grad():
        first = float(loss())
    for _ in range(20):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model(batch["input"])
    assert outputs["segmentation"].shape == (6, 13, 16, 32) and outputs["normal"].shape == (6, 3, 16, 32)
    model.train()
    assert float(loss()) < 0.8 * first


def test_first_validation_baselines_set_the_base_and_survive_a_checkpoint():
    callback = FirstValidationBaselines()
    callback.load_state_dict({"baselines": {"depth": {"abs_err": 2.0, "rel_err": 0.5}}})
    model = MultiTaskModule(ResNet(18, width=4, dense=True), [DepthTask("depth"), DepthTask("other", baselines={"abs_err": 1.0})])
    callback.on_validation_start(None, model)  # type: ignore[arg-type]
    assert model.tasks["depth"].baselines == {"abs_err": 2.0, "rel_err": 0.5}
    assert model.tasks["other"].baselines == {"abs_err": 1.0}  # shipped baselines are kept
    assert callback.state_dict() == {"baselines": {"depth": {"abs_err": 2.0, "rel_err": 0.5}}}
