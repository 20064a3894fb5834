"""PyTorch CPU side of `cargo run --release --example kernels_bench`.

Times one case with the same networks, shapes and losses as the Rust side and prints one JSON
object {"ms": median milliseconds, "peak_mb": peak resident memory}. Run by the benchmark with the
Python of .venv-bench (made by scripts/setup-bench.sh); not used by the product.
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k=3, stride=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)
    )


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride)
        self.b = conv_bn(cout, cout)
        self.short = (
            conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class ResNet20(nn.Module):
    """Same layers as datafree::onnx::fixtures::resnet20."""

    def __init__(self, classes=10):
        super().__init__()
        layers, cin = [conv_bn(3, 16), nn.ReLU()], 16
        for stage, cout in enumerate([16, 32, 64]):
            for block in range(3):
                layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


class GdfqGenerator(nn.Module):
    """The GDFQ reference CIFAR generator (github xushoukai/GDFQ)."""

    def __init__(self, classes=10, latent=100, size=32, channels=3):
        super().__init__()
        self.s = size // 4
        self.emb = nn.Embedding(classes, latent)
        self.l1 = nn.Linear(latent, 128 * self.s * self.s)
        self.b0 = nn.BatchNorm2d(128)
        self.b1 = nn.Sequential(
            nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2)
        )
        self.b2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
            nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z, y):
        h = self.l1(self.emb(y) * z).view(z.shape[0], 128, self.s, self.s)
        h = F.interpolate(self.b0(h), scale_factor=2)
        h = F.interpolate(self.b1(h), scale_factor=2)
        return self.b2(h)


def case_fn(case, batch):
    torch.manual_seed(0)
    if case.startswith("resnet20"):
        net = ResNet20().eval()
        x = torch.randn(batch, 3, 32, 32)
        if case == "resnet20_forward":
            def run():
                with torch.no_grad():
                    net(x)
            return run
        to_input = case == "resnet20_fwd_bwd_input"
        for p in net.parameters():
            p.requires_grad_(not to_input)
        x.requires_grad_(to_input)

        def run():
            net.zero_grad(set_to_none=True)
            x.grad = None
            net(x).sum().backward()
        return run
    if case.startswith("depthwise"):
        conv = nn.Conv2d(96, 96, 3, 1, 1, groups=96, bias=False)
        x = torch.randn(batch, 96, 16, 16)
        if case == "depthwise3x3_forward":
            def run():
                with torch.no_grad():
                    conv(x)
            return run
        x.requires_grad_(True)

        def run():
            conv.zero_grad(set_to_none=True)
            x.grad = None
            conv(x).sum().backward()
        return run
    if case == "gdfq_generator_fwd_bwd":
        g = GdfqGenerator().train()
        z = torch.randn(batch, 100)
        y = torch.randint(0, 10, (batch,))

        def run():
            g.zero_grad(set_to_none=True)
            g(z, y).sum().backward()
        return run
    raise SystemExit(f"unknown case {case}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = case_fn(a.case, a.batch)
    for _ in range(2):
        run()
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ms": statistics.median(times), "peak_mb": peak,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
