"""Our ResNets load a torchvision-layout state dict and compute the same eval-mode logits.

torchvision itself is not a dependency, so the reference is a plain PyTorch ResNet written
here with torchvision's module names and layout (BasicBlock / Bottleneck v1.5)."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import torch
    from torch import nn
except Exception as error:  # a broken torch install must skip, not fail, the suite
    pytest.skip(f"torch not importable: {error}", allow_module_level=True)

from flax import nnx  # noqa: E402

from finegrained.models import (assign_state, build_model, detect_layout,  # noqa: E402
                                flatten_state, to_flat, torchvision_resnet_to_flat)

ATOL = 1e-4


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    def __init__(self, block, layers, num_classes, width=64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, depth in enumerate(layers):
            setattr(self, f"layer{i + 1}",
                    self._make_layer(block, width * 2 ** i, depth, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomised_torch_resnet(block, layers, num_classes, seed):
    torch.manual_seed(seed)
    net = TorchResNet(block, layers, num_classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine terms
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        net.fc.weight.mul_(10.0)  # logits of order 10, so a layout slip cannot hide
    return net.eval()


@pytest.mark.parametrize("arch,block,layers", [
    ("resnet18", BasicBlock, (2, 2, 2, 2)),
    ("resnet50", Bottleneck, (3, 4, 6, 3)),
])
def test_torchvision_layout_gives_same_logits(arch, block, layers):
    num_classes = 10
    net = randomised_torch_resnet(block, layers, num_classes, seed=0)
    state_dict = {name: tensor.detach().numpy() for name, tensor in net.state_dict().items()}
    assert any(name.endswith("num_batches_tracked") for name in state_dict)
    assert detect_layout(state_dict) == "torchvision"

    # every tensor is loaded, so an abstract model (no random init, fast) is enough
    model = nnx.eval_shape(lambda: build_model(arch, num_classes, rngs=nnx.Rngs(1)))
    flat = torchvision_resnet_to_flat(state_dict)
    assert set(flat) == {"/".join(map(str, path)) for path, _ in
                         nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
    assign_state(model, to_flat(state_dict, arch))
    assert set(flatten_state(model)) == set(flat)

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(model(pixels))
    normalised = np.asarray(model.input_recipe.apply(pixels))  # the same network input
    with torch.no_grad():
        theirs = net(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
    assert ours.shape == theirs.shape == (2, num_classes)
    print(f"{arch}: max |logit difference| = {np.abs(ours - theirs).max():.3g} "
          f"(max |logit| {np.abs(theirs).max():.3g})")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
