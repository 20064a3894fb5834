"""PyTorch side of `cargo run --release --example iteration_bench` (CPU) and scripts/gpu-check.sh
(CUDA): one GDFQ iteration as datafree's `--preset quick` trains it, timed.

Warm-up iteration: the GDFQ CIFAR generator -> ResNet-20 teacher (eval, hooks on every BN input)
-> CE + 0.1 BNS -> Adam step of the generator; then the student's forward without gradients to
observe its activation ranges. Student iteration: the generator step, then a w4a4 fake-quantized
ResNet-20 student (BN folded into the conv weight, per-channel symmetric 4-bit weights, 4-bit
activations with learned ranges at every conv input, straight-through gradients) distilled at
temperature 20 on the generated batch against the teacher's logits of the generator step ->
SGD step of the weights, Adam step of the ranges, weights clamped to their clips.
Random weights: only the time matters. Prints one JSON object: median milliseconds and peak
resident memory. Not used by the product.
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels_bench import GdfqGenerator, ResNet20


class RoundSte(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class FqConvBn(nn.Module):
    """Conv + BN (running statistics) folded, its weight and its input fake-quantized."""

    def __init__(self, conv, bn, bits=4):
        super().__init__()
        self.conv, self.bn, self.bits = conv, bn, bits
        self.lo = nn.Parameter(torch.tensor(-4.0))
        self.hi = nn.Parameter(torch.tensor(4.0))
        self.observing = False

    def forward(self, x):
        c, bn = self.conv, self.bn
        if self.observing:
            with torch.no_grad():
                self.lo.mul_(0.9).add_(0.1 * x.min())
                self.hi.mul_(0.9).add_(0.1 * x.max())
        inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = c.weight * inv.view(-1, 1, 1, 1)
        b = bn.bias - bn.running_mean * inv
        m = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        qmax = 2 ** (self.bits - 1) - 1
        wq = torch.clamp(RoundSte.apply(w / m * qmax), -qmax, qmax) * m / qmax
        levels = 2**self.bits - 1
        scale = (self.hi - self.lo) / levels
        xc = torch.minimum(torch.maximum(x, self.lo), self.hi)
        xq = RoundSte.apply((xc - self.lo) / scale) * scale + self.lo
        return F.conv2d(xq, wq, b, c.stride, c.padding, c.dilation, c.groups)


def quantize(module):
    """Replaces every Sequential(conv, bn) of kernels_bench's ResNet-20 by FqConvBn."""
    for name, child in module.named_children():
        kids = list(child.children()) if isinstance(child, nn.Sequential) else []
        if len(kids) == 2 and isinstance(kids[0], nn.Conv2d) and isinstance(kids[1], nn.BatchNorm2d):
            setattr(module, name, FqConvBn(kids[0], kids[1]))
        else:
            quantize(child)
    return module


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    teacher = ResNet20().to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = quantize(ResNet20()).to(dev).eval()
    fq = [m for m in student.modules() if isinstance(m, FqConvBn)]
    ranges = [p for m in fq for p in (m.lo, m.hi)]
    weights = [p for n, p in student.named_parameters() if not n.endswith((".lo", ".hi"))]
    clips = [m.conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) for m in fq]
    gen = GdfqGenerator().to(dev).train()
    g_opt = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.999))
    s_opt = torch.optim.SGD(weights, 1e-3, momentum=0.9, weight_decay=1e-4, nesterov=True)
    r_opt = torch.optim.Adam(ranges, 1e-3)
    bn_in = []
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inp, _: bn_in.append((mod, inp[0])))

    def generator_step():
        bn_in.clear()
        z = torch.randn(a.batch, 100, device=dev)
        y = torch.randint(0, 10, (a.batch,), device=dev)
        x = gen(z, y)
        logits = teacher(x)
        loss = F.cross_entropy(logits, y)
        bns = 0.0
        for mod, t in bn_in:
            mean, var = t.mean(dim=(0, 2, 3)), t.var(dim=(0, 2, 3), unbiased=False)
            bns = bns + (mean - mod.running_mean).norm() + (var - mod.running_var).norm()
        g_opt.zero_grad(set_to_none=True)
        (loss + 0.1 * bns / len(bn_in)).backward()
        g_opt.step()
        return x.detach(), logits.detach()

    def warmup_step():
        x, _ = generator_step()
        for m in fq:
            m.observing = True
        with torch.no_grad():
            student(x)
        for m in fq:
            m.observing = False

    def student_step():
        x, t = generator_step()
        s = student(x)
        kd = F.kl_div(F.log_softmax(s / 20, 1), F.softmax(t / 20, 1), reduction="batchmean") * 400
        s_opt.zero_grad(set_to_none=True)
        r_opt.zero_grad(set_to_none=True)
        kd.backward()
        s_opt.step()
        r_opt.step()
        with torch.no_grad():
            for m, c in zip(fq, clips):
                m.conv.weight.copy_(torch.maximum(torch.minimum(m.conv.weight, c), -c))

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

    warm, full = timed(warmup_step), timed(student_step)
    print(json.dumps({"device": str(dev), "batch": a.batch, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "warmup_ms": warm, "full_ms": full,
                      "peak_mb": round(peak_mb(), 1)}))


if __name__ == "__main__":
    main()
