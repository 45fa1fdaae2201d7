#!/usr/bin/env python3
"""Plain PyTorch GPTQ on a GPU: the baseline qforge's CUDA backend is measured against.

The reference algorithm (FORMATS.md, "GPTQ reference algorithm"; IST-DASLab fasterquant),
float32 on one CUDA device, written out here so the comparison needs nothing but torch:
dead columns, act-order, damping, Cholesky -> cholesky_inverse -> upper Cholesky, lazy
blocks of 128 columns with the per-column rank-1 updates in Python, group parameters
refitted from the global W at each group boundary (the reference's own choice), and the
trailing update per block. TF32 is disabled, as in qforge's GPTQ GEMMs.

Layers are synthetic (heavy-tailed W, Hessian of correlated activations with outlier
channels; the values do not change the work done). For each shape the script times the
whole quantization (Hessian preparation to final codes, synchronised) over --repeats runs
after one warm-up run and prints one JSON line with the median seconds, e.g.

  python3 bench/torch_gptq_baseline.py                      # 4096x4096 and 11008x4096
  python3 bench/torch_gptq_baseline.py --shapes 4096x11008 --repeats 5

Compare with: qforge-bench --device cuda:0 --rows R --cols C --bits 4 --group-size 128
--act-order --repeats 5 (its median_seconds in the JSON on stderr).
"""

import argparse
import json
import statistics
import sys
import time


def parse_shape(text):
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def synthetic_layer(torch, rows, cols, samples, seed, device):
    """W: 0.02 * Student-t(4) [rows, cols]; H = 2/n X^T X of correlated activations."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(4.0))
    torch.manual_seed(seed)
    w = (0.02 * t.sample((rows, cols))).to(device=device, dtype=torch.float32)
    latent = torch.randn(samples, 8, generator=gen)
    mix = torch.randn(8, cols, generator=gen)
    noise = t.sample((samples, cols))
    scale = torch.exp(0.5 * torch.randn(cols, generator=gen))
    outliers = torch.randperm(cols, generator=gen)[: max(1, cols // 64)]
    scale[outliers] *= 10 + 40 * torch.rand(outliers.numel(), generator=gen)
    x = ((latent @ mix + noise) * scale).to(device=device, dtype=torch.float64)
    h = (2.0 / samples) * (x.T @ x)
    return w, h.to(torch.float32)


def find_params(torch, x, bits, sym):
    """The reference quantizer's min-max grid per row of x [rows, n]."""
    maxq = 2**bits - 1
    zero_t = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zero_t)
    xmax = torch.maximum(x.max(1).values, zero_t)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero] = -1
    xmax[both_zero] = 1
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize(torch, x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def gptq(torch, w, h, bits, group_size, act_order, sym, block_size=128, percdamp=0.01):
    """Returns (dequantized W in the original column order, proxy loss)."""
    maxq = 2**bits - 1
    w = w.clone()
    h = h.clone()
    columns = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = find_params(torch, w, bits, sym)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        invperm = torch.argsort(perm)
    losses = torch.zeros_like(w)
    q_all = torch.zeros_like(w)
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(columns, device=w.device)
    h[idx, idx] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        losses1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = find_params(torch, w[:, i1 + i : i1 + i + group_size], bits, sym)
            q = quantize(torch, col.unsqueeze(1), scale, zero, maxq).flatten()
            q1[:, i] = q
            losses1[:, i] = (col - q) ** 2 / d**2
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        q_all[:, i1:i2] = q1
        losses[:, i1:i2] = losses1 / 2
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    if act_order:
        q_all = q_all[:, invperm]
    return q_all, float(torch.sum(losses).item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"],
                        help="out x in of each layer")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-act-order", action="store_true")
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--samples", type=int, default=4096, help="activation rows for H")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("torch_gptq_baseline: PyTorch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("torch_gptq_baseline: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    act_order = not args.no_act_order
    sym = not args.asym

    for shape in args.shapes:
        rows, cols = parse_shape(shape)
        w, h = synthetic_layer(torch, rows, cols, args.samples, args.seed, device)
        times = []
        loss = 0.0
        for rep in range(args.repeats + 1):  # the first run warms up
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            _, loss = gptq(torch, w, h, args.bits, args.group_size, act_order, sym)
            torch.cuda.synchronize(device)
            if rep > 0:
                times.append(time.perf_counter() - start)
        print(json.dumps({
            "impl": "torch-gptq-reference",
            "rows": rows,
            "cols": cols,
            "bits": args.bits,
            "group_size": args.group_size,
            "act_order": act_order,
            "sym": sym,
            "repeats": args.repeats,
            "median_seconds": statistics.median(times),
            "seconds": times,
            "proxy_loss": loss,
            "gpu": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
