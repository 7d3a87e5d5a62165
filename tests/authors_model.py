"""A re-creation of the authors' ``resnet20_pq`` module layout (docs/paper.md, "The authors' released checkpoints"), written
from the description, to build files in exactly their checkpoint format for the tests.

Stages ``layer1..layer4`` are Sequentials of conv (with bias), BatchNorm2d, PReLU, then
blocks of ``conv1, bn1, prelu1, conv2, bn2, prelu2`` (no bias) with an identity shortcut;
the head is ``bn`` (BatchNorm1d of the flattened map), dropout, ``fc``, ``last_bn``.
"""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.prelu1 = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu2 = nn.PReLU(planes)

    def forward(self, x):
        out = self.prelu1(self.bn1(self.conv1(x)))
        out = self.prelu2(self.bn2(self.conv2(out)))
        return x + out


class Resnet20PQ(nn.Module):
    def __init__(self, feature_dim: int, input_size: int = 112, width: int = 64) -> None:
        super().__init__()
        strides = (2, 2, 2, 2) if input_size == 112 else (1, 2, 2, 2)
        planes = [width, 2 * width, 4 * width, 8 * width]
        inplanes = 3
        for i, (p, s, n) in enumerate(zip(planes, strides, (1, 2, 4, 1)), start=1):
            layers = [nn.Conv2d(inplanes, p, 3, s, 1, bias=True), nn.BatchNorm2d(p), nn.PReLU(p)]
            layers += [Block(p) for _ in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            inplanes = p
        side = 7 if input_size == 112 else 4
        self.bn = nn.BatchNorm1d(planes[-1] * side * side)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(planes[-1] * side * side, feature_dim)
        self.last_bn = nn.BatchNorm1d(feature_dim)

    def forward(self, x):
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        x = x.view(x.size(0), -1)
        return self.last_bn(self.fc(self.dropout(self.bn(x))))


def randomize(net: nn.Module, generator: torch.Generator) -> None:
    """Random weights and non-trivial BatchNorm statistics and affine parameters."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (1.5 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.2)
                module.num_batches_tracked.fill_(1234)
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.4)


def save_authors_checkpoint(path, input_size: int, width: int, num_books: int,
                            num_words: int, word_dim: int, seed: int = 0):
    """Write ``{'backbone': DataParallel(net).state_dict(), 'mlp': Parameter (M, d, K)}``;
    returns the (eval-mode) network and the mlp."""
    generator = torch.Generator().manual_seed(seed)
    net = Resnet20PQ(num_books * word_dim, input_size, width)
    randomize(net, generator)
    mlp = nn.Parameter(torch.randn(num_books, word_dim, num_words, generator=generator) * 0.3)
    torch.save({"backbone": nn.DataParallel(net).state_dict(), "mlp": mlp}, path)
    return net.eval(), mlp
