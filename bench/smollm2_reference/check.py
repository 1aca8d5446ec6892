#!/usr/bin/env python3
"""Independent check of vqkv's GGUF path (reader, dequantization, tokenizer, LLaMA forward).

Reference side, sharing no code with the C++ (the numpy forward is tests/model/reference_llama.py's,
the one the tinystories check uses):
  * llama.cpp's own `gguf` package (GGUFReader + gguf.quants.dequantize) reads and
    dequantizes the file;
  * Hugging Face `tokenizers` builds the byte-level BPE from the GGUF vocabulary and merges
    (Digits(individual) + ByteLevel pre-tokenizer, ByteLevel decoder: SmolLM2's tokenizer.json);
  * a numpy LLaMA forward (HF semantics) after undoing convert_hf_to_gguf.py's Q/K permutation.
C++ side: the file written by `vqkv_gguf_dump MODEL.gguf OUT.safetensors PROMPT` (tests/model).

Checks: dequantized tensors bit-identical; token ids equal; logits and post-RoPE K/V (every
layer) within 1e-3 relative (max |a-b| / max |b|); the greedy continuation printed.

Setup (not needed by CI):
  python3 -m venv /tmp/venv-smol && /tmp/venv-smol/bin/pip install gguf numpy tokenizers
  /tmp/venv-smol/bin/python bench/smollm2_reference/check.py --gguf M.gguf --dump OUT.safetensors
Exit status 0 when every check passes.
"""

import argparse
import json
import struct
import sys

import os

import numpy as np
import gguf
from gguf import GGUFReader
from gguf.quants import dequantize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "tests", "model"))
from reference_llama import LlamaForward, load_safetensors  # noqa: E402


def field_str(r, key):
    f = r.fields[key]
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def field_num(r, key):
    f = r.fields[key]
    return f.parts[f.data[0]][0].item()


def field_strs(r, key):
    f = r.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


# GGUF tensor names of the Hugging Face weights the shared forward asks for.
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


class Reference(LlamaForward):
    """The GGUF file read and dequantized by llama.cpp's gguf package, run through the numpy
    forward of tests/model/reference_llama.py."""

    def __init__(self, path):
        self.r = GGUFReader(path)
        self.tensors = {t.name: t for t in self.r.tensors}
        p = "llama."
        self.n_layers = field_num(self.r, p + "block_count")
        self.n_heads = field_num(self.r, p + "attention.head_count")
        self.n_kv = field_num(self.r, p + "attention.head_count_kv")
        self.hidden = field_num(self.r, p + "embedding_length")
        self.hd = self.hidden // self.n_heads
        self.eps = field_num(self.r, p + "attention.layer_norm_rms_epsilon")
        self.theta = field_num(self.r, p + "rope.freq_base")
        self._cache = {}
        self.embed = self.deq("token_embd.weight")
        self.head = self.deq("output.weight") if "output.weight" in self.tensors else self.embed

    def deq(self, name):
        if name not in self._cache:
            t = self.tensors[name]
            a = dequantize(t.data, t.tensor_type)
            self._cache[name] = np.asarray(a, dtype=np.float32).reshape(
                [int(d) for d in reversed(t.shape)])
        return self._cache[name]

    def w(self, hf_name):
        if hf_name == "model.norm.weight":
            return self.deq("output_norm.weight")
        _, _, layer, rest = hf_name.split(".", 3)  # model.layers.L.rest
        a = self.deq("blk.%s.%s" % (layer, GGUF_NAMES[rest]))
        heads = {"self_attn.q_proj.weight": self.n_heads,
                 "self_attn.k_proj.weight": self.n_kv}.get(rest, 0)
        if heads:
            # convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, cols)
            #                        .swapaxes(1, 2).reshape(w.shape); this is its inverse.
            rows, cols = a.shape
            a = a.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        return a


def hf_tokenizer(r):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken
    toks = field_strs(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in field_strs(r, "tokenizer.ggml.merges")]
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(toks, types) if ty == 3])
    return tk


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dump", required=True, help="output of vqkv_gguf_dump")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--generate", type=int, default=0,
                    help="also greedy-generate this many tokens in numpy and compare")
    args = ap.parse_args()
    ok = True
    ref = Reference(args.gguf)
    cpp, meta = load_safetensors(args.dump, with_metadata=True)

    # 1. dequantized tensors, bit for bit
    names = meta["tensors"].split(",")
    types = {}
    for n in names:
        a, b = cpp["tensor." + n], ref.deq(n)
        same = a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
        types.setdefault(ref.tensors[n].tensor_type.name, []).append(same)
        if not same:
            ok = False
            print("MISMATCH tensor %s: max |diff| %g" % (n, np.max(np.abs(a - b))))
    for t, v in sorted(types.items()):
        print("dequantized %-5s tensors: %d/%d bit-identical" % (t, sum(v), len(v)))

    # 2. tokenizer
    tk = hf_tokenizer(ref.r)
    n_str = int(meta["strings"])
    same_ids = 0
    for i in range(n_str):
        text = meta["enc.%d" % i]
        want = tk.encode(text).ids
        got = cpp["enc.%d" % i].tolist()
        if got == want and meta["dec.%d" % i] == tk.decode(want, skip_special_tokens=True):
            same_ids += 1
        else:
            ok = False
            print("TOKENIZER MISMATCH on %r:\n  vqkv %s\n  hf   %s\n  vqkv decode %r\n  hf decode %r" %
                  (text, got, want, meta["dec.%d" % i], tk.decode(want, skip_special_tokens=True)))
    print("tokenizer: %d/%d strings give identical ids and decodings" % (same_ids, n_str))

    # 3. forward
    ids = cpp["ids"].tolist()
    cap = []
    logits = ref.forward(ids, cap)
    e_logits = rel(cpp["logits"], logits)
    e_k = max(rel(cpp["k.%d" % l], cap[l][1]) for l in range(ref.n_layers))
    e_v = max(rel(cpp["v.%d" % l], cap[l][2]) for l in range(ref.n_layers))
    e_q = max(rel(cpp["q.%d" % l], cap[l][0]) for l in range(ref.n_layers))
    top1 = float(np.mean(np.argmax(cpp["logits"], -1) == np.argmax(logits, -1)))
    print("forward over %d tokens: logits rel err %.2e, K %.2e, V %.2e, Q %.2e (max over %d "
          "layers), top-1 agreement %.3f" % (len(ids), e_logits, e_k, e_v, e_q, ref.n_layers, top1))
    for name, e in (("logits", e_logits), ("K", e_k), ("V", e_v)):
        if not e <= args.tol:
            ok = False
            print("FAIL: %s relative error %.2e > %.0e" % (name, e, args.tol))

    gen = cpp["generated"].tolist()
    print("vqkv greedy continuation: %r" % meta["generated_text"])
    if args.generate:
        seq = list(ids)
        for _ in range(min(args.generate, len(gen))):
            seq.append(int(np.argmax(ref.forward(seq)[-1])))
        ref_gen = seq[len(ids):]
        print("numpy greedy continuation: %r (%s)" % (
            tk.decode(ref_gen, skip_special_tokens=True),
            "identical ids" if ref_gen == gen[:len(ref_gen)] else "DIFFERENT ids"))
        ok &= ref_gen == gen[:len(ref_gen)]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
