"""Small versions of the engine's nets and a concat net, shared by the tests (imported as ``nets``)."""
import torch
import torch.nn as nn

from edropout.app.models import build_model

NETS = ("mlp", "lenet", "resnet18", "alexnet", "squeezenet")


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv that reads both: couplings through a concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.b = nn.Conv2d(1, 3, 1)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.cat([torch.relu(self.bn(self.a(x))), torch.tanh(self.b(x))], dim=1)
        return self.fc(torch.relu(self.c(h)).mean(dim=(2, 3)))


def small_net(name, seed=0):
    torch.manual_seed(seed)
    if name == "concat":
        return ConcatNet()
    return build_model(name, 1, 8, 10, 24 if name == "mlp" else 4)


def randomise_bn(model, seed=0):
    """Non-trivial BatchNorm affine parameters and running statistics, so masking bugs cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model
