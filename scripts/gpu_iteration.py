"""PyTorch side of scripts/gpu-check.sh: one GDFQ iteration as datafree trains it, timed.

Warm-up iteration: the GDFQ CIFAR generator -> ResNet-20 teacher (eval, hooks on every BN input)
-> CE + 0.1 BNS -> Adam step of the generator. Full iteration: that, then a w4a4 fake-quantized
ResNet-20 student (per-channel symmetric 4-bit weights, 4-bit activations at every conv input,
straight-through gradients) distilled at temperature 20 on the generated batch -> SGD step.
Random weights: only the time matters. Prints one JSON object with median milliseconds.
Not used by the product.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels_bench import GdfqGenerator, ResNet20


def fake_quant(x, lo, hi, bits):
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    q = torch.clamp(torch.round((x - lo) / scale), 0, levels) * scale + lo
    return x + (q - x).detach()


class FqConv(nn.Module):
    """A conv whose input (fixed range) and weight (per channel, symmetric) are fake-quantized."""

    def __init__(self, conv, bits=4):
        super().__init__()
        self.conv, self.bits = conv, bits

    def forward(self, x):
        w = self.conv.weight
        m = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        qmax = 2 ** (self.bits - 1) - 1
        wq = w + (torch.clamp(torch.round(w / m * qmax), -qmax, qmax) * m / qmax - w).detach()
        x = fake_quant(x, -4.0, 4.0, self.bits)
        c = self.conv
        return F.conv2d(x, wq, c.bias, c.stride, c.padding, c.dilation, c.groups)


def quantize(module):
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, FqConv(child))
        else:
            quantize(child)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    teacher = ResNet20().to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = quantize(ResNet20()).to(dev).train()
    gen = GdfqGenerator().to(dev).train()
    g_opt = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.999))
    s_opt = torch.optim.SGD(student.parameters(), 1e-4, momentum=0.9, weight_decay=1e-4)
    bn_in = []
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inp, _: bn_in.append((mod, inp[0])))

    def generator_step():
        bn_in.clear()
        z = torch.randn(a.batch, 100, device=dev)
        y = torch.randint(0, 10, (a.batch,), device=dev)
        x = gen(z, y)
        loss = F.cross_entropy(teacher(x), y)
        bns = 0.0
        for mod, t in bn_in:
            mean, var = t.mean(dim=(0, 2, 3)), t.var(dim=(0, 2, 3), unbiased=False)
            bns = bns + (mean - mod.running_mean).norm() + (var - mod.running_var).norm()
        g_opt.zero_grad(set_to_none=True)
        (loss + 0.1 * bns / len(bn_in)).backward()
        g_opt.step()
        return x.detach()

    def full_step():
        x = generator_step()
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kd = F.kl_div(F.log_softmax(s / 20, 1), F.softmax(t / 20, 1), reduction="batchmean") * 400
        s_opt.zero_grad(set_to_none=True)
        kd.backward()
        s_opt.step()

    def timed(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(a.reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(times), 2)

    print(json.dumps({"device": str(dev), "batch": a.batch, "torch": torch.__version__,
                      "warmup_ms": timed(generator_step), "full_ms": timed(full_step)}))


if __name__ == "__main__":
    main()
