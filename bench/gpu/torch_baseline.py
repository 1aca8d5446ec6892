#!/usr/bin/env python3
"""The same rvq encode and decode written plainly in PyTorch, for the side-by-side figure.

Geometry LLaMA-3.1-8B: 32 layers, 8 KV heads, head_dim 128, keys 56x1024, values 16x512.
Encode, per layer and K/V, per stage: bf16 matmul for the scores, argmin, gather, fp32 residual
update. Decode: sum of the gathered codewords. Times are CUDA-event medians after a warm-up.

    python3 bench/gpu/torch_baseline.py [--tokens 2048] [--decode-tokens 8192] [--reps 3]
"""
import argparse

import torch

L, H, D = 32, 8, 128
K_STAGES, K_SIZE, V_STAGES, V_SIZE = 56, 1024, 16, 512


def median_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    decay = lambda s: 1.6 * 0.9 ** torch.arange(s, device=dev, dtype=torch.float32)
    cbk = torch.randn(L, K_STAGES, K_SIZE, D, device=dev, generator=g) * decay(K_STAGES)[None, :, None, None]
    cbv = torch.randn(L, V_STAGES, V_SIZE, D, device=dev, generator=g) * decay(V_STAGES)[None, :, None, None]
    tables = [(cbk, cbk.to(torch.bfloat16), (cbk * cbk).sum(-1)), (cbv, cbv.to(torch.bfloat16), (cbv * cbv).sum(-1))]

    n = args.tokens
    offset = 2 * torch.randn(D, device=dev, generator=g)
    x = (torch.randn(L, 2, n * H, D, device=dev, generator=g) + offset).to(torch.float16)

    def encode():
        codes = []
        for l in range(L):
            for c in range(2):
                cb32, cb16, norms = tables[c]
                r = x[l, c].float()
                out = []
                for s in range(cb32.shape[1]):
                    scores = r.to(torch.bfloat16) @ cb16[l, s].T
                    idx = (norms[l, s][None, :] - 2 * scores.float()).argmin(1)
                    r = r - cb32[l, s][idx]
                    out.append(idx)
                codes.append(torch.stack(out, 1))
        return codes

    ms = median_ms(encode, args.reps)
    enc_tps = n / (ms * 1e-3)
    print(f"RESULT | torch plain encode ({n} tokens) | {enc_tps:.0f} tok/s | - | {ms:.1f} ms per call")

    nd = args.decode_tokens
    codes_k = torch.randint(0, K_SIZE, (L, nd * H, K_STAGES), device=dev, generator=g)
    codes_v = torch.randint(0, V_SIZE, (L, nd * H, V_STAGES), device=dev, generator=g)
    out = torch.empty(L, 2, nd * H, D, device=dev, dtype=torch.float16)

    def decode():
        for l in range(L):
            for c, (codes, (cb32, _, _)) in enumerate(((codes_k, tables[0]), (codes_v, tables[1]))):
                stages = cb32.shape[1]
                acc = torch.zeros(nd * H, D, device=dev)
                for s in range(stages):
                    acc += cb32[l, s][codes[l, :, s]]
                out[l, c] = acc.to(torch.float16)

    ms = median_ms(decode, args.reps)
    dec_tps = nd / (ms * 1e-3)
    print(f"RESULT | torch plain decode ({nd} tokens) | {dec_tps:.0f} tok/s | - | {ms:.1f} ms per call")


if __name__ == "__main__":
    main()
