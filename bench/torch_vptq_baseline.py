#!/usr/bin/env python3
"""Plain-PyTorch baseline of VPTQ's heavy phases, for the ratio against qforge's CUDA backend.

What runs per layer shape (synthetic W and H, the same pipeline as quant/vptq.h):
  hessian         dead-free H, act-order, damping, Cholesky, inverse, upper Cholesky (torch.linalg)
  kmeans          Hessian-weighted Lloyd on the vectors (length v along out_features) of the
                  normalised, permuted W: distances as ||x||^2 - 2 x.c + ||c||^2 (torch.addmm,
                  the torch.cdist-style GEMM form) in point chunks + argmin, centroid update by
                  index_add_; random init (the VPTQ reference's choice); fixed iteration count
  first_pass      the column-wise VQ pass with error feedback through U (upper Cholesky factor
                  of H^-1), lazy blocks of 128 columns (in-block rank-1 updates, one matmul per
                  block)
  residual_kmeans the same Lloyd on the error the first pass left (k_res centroids)
  second_pass     the pass again with both codebooks frozen (nearest main, then nearest
                  residual centroid to the remainder)

Each phase is timed with torch.cuda.synchronize() around it and repeated; the JSON printed on
stdout holds the median seconds per phase (k-means also per iteration, since the reference
runs 100 iterations and the baseline defaults to fewer to keep the run short).

Usage (on the GPU machine):
  python3 bench/torch_vptq_baseline.py                       # 4096x4096 and 14336x4096, v8 k65536 r256
  python3 bench/torch_vptq_baseline.py --shapes 256x512 --k 256 --kr 16 --device cpu   # smoke test
"""
import argparse
import json
import statistics
import sys
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,14336x4096", help="comma-separated OUTxIN layer shapes")
    p.add_argument("--v", type=int, default=8, help="vector length (rows per vector)")
    p.add_argument("--k", type=int, default=65536, help="main codebook entries")
    p.add_argument("--kr", type=int, default=256, help="residual codebook entries (0 = none)")
    p.add_argument("--kmeans-iters", type=int, default=10, help="Lloyd iterations per k-means run")
    p.add_argument("--repeats", type=int, default=3, help="runs per phase (median reported)")
    p.add_argument("--block", type=int, default=128, help="columns per lazy block")
    p.add_argument("--chunk-bytes", type=int, default=1 << 30,
                   help="size of one float32 [points, k] distance chunk")
    p.add_argument("--samples", type=int, default=2048, help="activation rows for the synthetic H")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """Runs fn() and returns (result, seconds) with the device synchronised around it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def synthetic_layer(out_f, in_f, samples, gen, device):
    """Heavy-tailed W [out, in] and H = 2/n X^T X of correlated activations with a few outlier
    channels (the structure of quant/synthetic.h, in torch's generator)."""
    chi2 = torch.randn(4, out_f, in_f, generator=gen, device=device).square().sum(dim=0)
    w = 0.02 * torch.randn(out_f, in_f, generator=gen, device=device) * torch.rsqrt(chi2 / 4.0)  # Student-t(4)
    latent = torch.randn(samples, 8, generator=gen, device=device)
    mix = torch.randn(8, in_f, generator=gen, device=device)
    x = latent @ mix + torch.randn(samples, in_f, generator=gen, device=device)
    x = x * torch.exp(0.5 * torch.randn(in_f, generator=gen, device=device))
    outliers = torch.randperm(in_f, generator=gen, device=device)[: max(1, in_f // 64)]
    x[:, outliers] *= 20.0
    h = (2.0 / samples) * (x.T @ x)
    return w, h


def prepare(w, h):
    """Normalisation (per input column min-max), act-order, the scaled Hessian, U; returns
    (W normalised and permuted, transposed [in, out], U, permuted scaled H, k-means weights)."""
    mn = w.min(dim=0).values
    scale = (w.max(dim=0).values - mn).clamp_min(1e-12)
    wn = (w - mn) / scale
    hs = h * scale[:, None] * scale[None, :]
    perm = torch.argsort(torch.diagonal(hs), descending=True)
    hp = hs[perm][:, perm]
    damp = 0.01 * torch.diagonal(hp).mean()
    hp = hp + damp * torch.eye(hp.shape[0], device=hp.device, dtype=hp.dtype)
    lower = torch.linalg.cholesky(hp)
    hinv = torch.cholesky_inverse(lower)
    u = torch.linalg.cholesky(hinv, upper=True)
    wt = wn[:, perm].T.contiguous()  # [in, out]: row p = permuted column p
    weights = torch.diagonal(hp).clamp_min(0)  # k-means sample weight per column
    return wt, u, hp, weights


def nearest(x, c, c_norm, chunk):
    """argmin_j ||x_i - c_j||^2 via ||x||^2 - 2 x.c + ||c||^2 (||x||^2 dropped: constant per row)."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        e = min(x.shape[0], s + chunk)
        d = torch.addmm(c_norm, x[s:e], c.T, beta=1.0, alpha=-2.0)
        out[s:e] = torch.argmin(d, dim=1)
    return out


def kmeans(points, weights, k, iters, chunk_bytes, gen):
    """Weighted Lloyd with random init; returns (centroids, per-iteration seconds)."""
    device = points.device
    n = points.shape[0]
    c = points[torch.randperm(n, generator=gen, device=device)[:k]].clone()
    chunk = max(1, chunk_bytes // (4 * k))
    per_iter = []
    wx = points * weights[:, None]
    for _ in range(iters):
        def step():
            a = nearest(points, c, (c * c).sum(dim=1), chunk)
            sums = torch.zeros_like(c).index_add_(0, a, wx)
            wsum = torch.zeros(k, device=device, dtype=points.dtype).index_add_(0, a, weights)
            filled = wsum > 0
            c[filled] = sums[filled] / wsum[filled, None]
        _, s = timed(device, step)
        per_iter.append(s)
    return c, per_iter


def column_vectors(wt_row, v):
    return wt_row.view(-1, v)


def vq_pass(wt, u, v, cb, res_cb, block, want_err):
    """The column-wise pass with error feedback; returns the quantised weights q [in, out] and,
    when asked, the error at quantisation time (w - q)."""
    n_cols, m = wt.shape
    work = wt.clone()
    quantised = torch.empty_like(wt)
    err_left = torch.empty_like(wt) if want_err else None
    cb_norm = (cb * cb).sum(dim=1)
    res_norm = (res_cb * res_cb).sum(dim=1) if res_cb is not None else None
    for i in range(0, n_cols, block):
        j = min(n_cols, i + block)
        eblock = torch.empty(j - i, m, device=wt.device, dtype=wt.dtype)
        for p in range(i, j):
            x = column_vectors(work[p], v)
            idx = nearest(x, cb, cb_norm, x.shape[0])
            q = cb[idx]
            if res_cb is not None:
                ridx = nearest(x - q, res_cb, res_norm, x.shape[0])
                q = q + res_cb[ridx]
            e = (x - q).reshape(-1)
            quantised[p] = q.reshape(-1)
            if want_err:
                err_left[p] = e
            err = e / u[p, p]
            eblock[p - i] = err
            if p + 1 < j:
                work[p + 1 : j] -= u[p, p + 1 : j, None] * err[None, :]
        if j < n_cols:
            work[j:] -= u[i:j, j:].T @ eblock
    return quantised, err_left


def relative_error(wt, q, hp):
    """tr(dW Hp dW^T) / tr(W Hp W^T) in the normalised, permuted space (wt, q: [in, out])."""
    d = wt - q
    return float((d * (hp @ d)).sum() / (wt * (hp @ wt)).sum())


def median(xs):
    return statistics.median(xs) if xs else None


def run_shape(out_f, in_f, args, device):
    if out_f % args.v != 0:
        raise SystemExit(f"out_features {out_f} must be a multiple of v={args.v} for this baseline")
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    w, h = synthetic_layer(out_f, in_f, args.samples, gen, device)
    phases = {"hessian_s": [], "kmeans_iteration_s": [], "first_pass_s": [],
              "residual_kmeans_iteration_s": [], "second_pass_s": []}
    errors = {"first_pass": [], "second_pass": []}  # sanity: relative proxy error
    for _ in range(args.repeats):
        (wt, u, hp, col_w), s = timed(device, lambda: prepare(w, h))
        phases["hessian_s"].append(s)
        rows = out_f // args.v
        points = wt.reshape(-1, args.v)  # column-major order of vectors: column p, rows r
        weights = col_w.repeat_interleave(rows)
        cb, iters = kmeans(points, weights, args.k, args.kmeans_iters, args.chunk_bytes, gen)
        phases["kmeans_iteration_s"].extend(iters)
        (q, err), s = timed(device, lambda: vq_pass(wt, u, args.v, cb, None, args.block, args.kr > 0))
        phases["first_pass_s"].append(s)
        errors["first_pass"].append(relative_error(wt, q, hp))
        if args.kr > 0:
            res_cb, iters = kmeans(err.reshape(-1, args.v), weights, args.kr, args.kmeans_iters,
                                   args.chunk_bytes, gen)
            phases["residual_kmeans_iteration_s"].extend(iters)
            (q, _), s = timed(device, lambda: vq_pass(wt, u, args.v, cb, res_cb, args.block, False))
            phases["second_pass_s"].append(s)
            errors["second_pass"].append(relative_error(wt, q, hp))
        del wt, u, hp, col_w, points, weights, cb, q, err
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"out_features": out_f, "in_features": in_f, "vectors": out_f // args.v * in_f}
    for name, xs in phases.items():
        result[name] = median(xs)
    it = result["kmeans_iteration_s"]
    result["kmeans_100_iterations_s"] = None if it is None else 100 * it
    for name, xs in errors.items():
        result[name + "_relative_error"] = median(xs)
    rit = result["residual_kmeans_iteration_s"]
    result["residual_kmeans_100_iterations_s"] = None if rit is None else 100 * rit
    return result


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; pass --device cpu for a smoke test")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs, as qforge's default context
    shapes = []
    for s in args.shapes.split(","):
        out_f, in_f = (int(x) for x in s.lower().split("x"))
        shapes.append(run_shape(out_f, in_f, args, device))
    report = {
        "baseline": "torch_vptq_baseline",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {"v": args.v, "k": args.k, "kr": args.kr, "kmeans_iterations": args.kmeans_iters,
                   "repeats": args.repeats, "block": args.block, "chunk_bytes": args.chunk_bytes,
                   "seed": args.seed},
        "shapes": shapes,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
