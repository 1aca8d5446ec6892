#!/usr/bin/env python3
"""Where a model's attention goes inside a packed long context.

Reads a samples file written by `vqkv capture --pack` (post-RoPE K, V and Q of one or more
packed sequences) and prints, per layer, the mean share of attention mass that falls on
compressed positions (after the exact sinks, before the exact recent window) and how much of it
lands on the first token of each packed story (found as the positions whose layer-0 value
vector equals that of position 0: layer-0 V depends on the token alone). It also ranks those
tokens by key/value norm. This is what motivated rvq's outlier tokens (CodecSpec::outliers).

  build/client/cpp/cli/vqkv capture --model MODEL --part second-half --max-tokens 2048 \
      --max-seqs 1 --pack --out /tmp/ev2k.safetensors
  /usr/bin/python3 bench/fidelity/attention_mass.py /tmp/ev2k.safetensors

Needs NumPy (Debian python3-numpy).
"""
import json
import struct
import sys

import numpy as np


def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    base = 8 + n

    def tensor(name):
        m = header[name]
        a, b = m["data_offsets"]
        return np.frombuffer(raw[base + a:base + b], dtype=np.float32).reshape(m["shape"])

    lens = [int(x) for x in header["__metadata__"]["seq_lens"].split(",")]
    layers = sum(1 for k in header if k.endswith(".k"))
    return tensor, lens, layers


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    tensor, lens, layers = load(sys.argv[1])
    sinks, recent, stride = 4, 32, 7
    t = lens[0]  # the first sequence
    v0 = tensor("layer0.v")[:t]
    starts = np.array([p for p in range(sinks, t) if np.allclose(v0[p], v0[0], atol=1e-5)])
    print(f"sequence of {t} tokens; {len(starts)} story starts past the {sinks} sinks")
    queries = np.arange(min(600, t - 1), t, stride)
    for layer in range(layers):
        k = tensor(f"layer{layer}.k")[:t]
        v = tensor(f"layer{layer}.v")[:t]
        q = tensor(f"layer{layer}.q")[:t]
        kv_heads, q_heads, dim = k.shape[1], q.shape[1], k.shape[2]
        group = q_heads // kv_heads
        comp = on_starts = 0.0
        count = 0
        for qi in queries:
            end = qi + 1 - recent
            for hq in range(q_heads):
                s = k[:qi + 1, hq // group] @ q[qi, hq] / np.sqrt(dim)
                p = np.exp(s - s.max())
                p /= p.sum()
                if end > sinks:
                    comp += p[sinks:end].sum()
                    on_starts += p[starts[starts < end]].sum()
                count += 1
        norms = np.linalg.norm(k[sinks:], axis=2).sum(1) + np.linalg.norm(v[sinks:], axis=2).sum(1)
        rank = (-norms).argsort().argsort()
        start_ranks = sorted(rank[starts - sinks].tolist())
        print(f"layer {layer:2d}: attention on compressed positions {comp / count:.3f}, "
              f"on story starts {on_starts / count:.3f}; K+V norm ranks of the starts "
              f"(0 = largest of {t - sinks}): {start_ranks[:3]}..{start_ranks[-1:]}")


if __name__ == "__main__":
    main()
