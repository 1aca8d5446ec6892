#!/usr/bin/env python3
"""Independent numpy reference for vqkv::model (tokenizer + LLaMA forward).

Written from the Hugging Face semantics, sharing no code with the C++ side: it parses
safetensors and tokenizer.json itself, runs BPE by the plain "merge the best-ranked pair,
leftmost first" loop, and runs the LLaMA forward with numpy matmuls.

Usage: reference_llama.py --model DIR --input REQUEST.json
REQUEST.json: {"encode": [str, ...], "prompt": str, "generate": int}
Prints one JSON object on stdout:
  encodings     ids of each "encode" string (no BOS)
  prompt_ids    BOS + prompt ids, the normaliser's lone leading "▁" token dropped,
                cut to max_position_embeddings
  logits        {position: [vocab floats]} for the first, middle and last prompt position
  k, v, q       {layer: flat post-RoPE floats} for layers 0 and 1 over the prompt
  generated     greedy ids after BOS (stops after EOS), and generated_text their decoding
"""

import argparse
import json
import os
import struct
import sys

import numpy as np


# ----------------------------------------------------------------------------- safetensors

def load_safetensors(path, with_metadata=False):
    """Tensors of a safetensors file as float32 arrays (I32 stays int32); with_metadata also
    returns the __metadata__ dict."""
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    meta = header.pop("__metadata__", {})
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = data[base + begin:base + end]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "I32":
            out[name] = np.frombuffer(raw, dtype="<i4").reshape(info["shape"])
            continue
        else:
            raise ValueError("unsupported dtype %s for %s" % (dt, name))
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return (out, meta) if with_metadata else out


# ----------------------------------------------------------------------------- tokenizer

class BpeTokenizer:
    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
        assert model["type"] == "BPE"
        self.vocab = dict(model["vocab"])
        self.id_to_tok = {i: t for t, i in self.vocab.items()}
        self.specials = set()
        self.added = []  # (match string, id, normalized)
        for a in tj.get("added_tokens", []):
            self.id_to_tok[a["id"]] = a["content"]
            self.vocab.setdefault(a["content"], a["id"])
            if a.get("special"):
                self.specials.add(a["id"])
        self.ranks = {}
        for rank, m in enumerate(model["merges"]):
            a, b = m.split(" ") if isinstance(m, str) else m
            self.ranks[(a, b)] = rank
        self.byte_fallback = model.get("byte_fallback", False)
        self.fuse_unk = model.get("fuse_unk", False)
        self.unk = self.vocab.get(model.get("unk_token"))
        norm = tj["normalizer"]
        self.norm_ops = norm["normalizers"] if norm and norm["type"] == "Sequence" else (
            [norm] if norm else [])
        assert tj.get("pre_tokenizer") is None
        for a in tj.get("added_tokens", []):
            match = self.normalize(a["content"]) if a.get("normalized", True) else a["content"]
            self.added.append((match, a["id"], a.get("normalized", True)))
        single = tj["post_processor"]["single"]
        self.bos = tj["post_processor"]["special_tokens"][single[0]["SpecialToken"]["id"]]["ids"][0]
        self.prepend = next((op["prepend"] for op in self.norm_ops if op["type"] == "Prepend"), None)

    def normalize(self, s):
        for op in self.norm_ops:
            if op["type"] == "Prepend":
                if s:
                    s = op["prepend"] + s
            elif op["type"] == "Replace":
                s = s.replace(op["pattern"]["String"], op["content"])
            else:
                raise ValueError(op["type"])
        return s

    def split_added(self, pieces, normalized):
        out = []
        for text, tid in pieces:
            if tid is not None:
                out.append((text, tid))
                continue
            pos = 0
            while True:
                best = None
                for match, aid, norm in self.added:
                    if norm != normalized or not match:
                        continue
                    hit = text.find(match, pos)
                    if hit < 0:
                        continue
                    if best is None or hit < best[0] or (hit == best[0] and len(match) > best[1]):
                        best = (hit, len(match), aid)
                if best is None:
                    break
                if best[0] > pos:
                    out.append((text[pos:best[0]], None))
                out.append(("", best[2]))
                pos = best[0] + best[1]
            if pos < len(text):
                out.append((text[pos:], None))
        return out

    def bpe(self, word):
        syms = []
        last_unk = False
        for ch in word:
            if ch in self.vocab:
                syms.append(ch)
                last_unk = False
                continue
            if self.byte_fallback:
                bts = ["<0x%02X>" % b for b in ch.encode("utf-8")]
                if all(b in self.vocab for b in bts):
                    syms.extend(bts)
                    last_unk = False
                    continue
            if self.unk is None or (self.fuse_unk and last_unk):
                continue
            syms.append(self.id_to_tok[self.unk])
            last_unk = True
        while len(syms) > 1:
            best_i, best_r = -1, None
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_r is None or r < best_r):
                    best_i, best_r = i, r
            if best_i < 0:
                break
            syms[best_i:best_i + 2] = [syms[best_i] + syms[best_i + 1]]
        return [self.vocab[s] for s in syms]

    def encode(self, text):
        ids = []
        for raw, tid in self.split_added([(text, None)], False):
            if tid is not None:
                ids.append(tid)
                continue
            for piece, pid in self.split_added([(self.normalize(raw), None)], True):
                ids.extend([pid] if pid is not None else self.bpe(piece))
        return ids

    def encode_for_scoring(self, text):
        ids = self.encode(text)
        if ids and self.prepend is not None and ids[0] == self.vocab.get(self.prepend):
            ids = ids[1:]
        return [self.bos] + ids

    def decode(self, ids):
        text = "".join(self.id_to_tok[i] for i in ids if i not in self.specials)
        text = text.replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


# ----------------------------------------------------------------------------- model

class LlamaForward:
    """The LLaMA forward in Hugging Face semantics. Subclasses set n_layers, n_heads, n_kv, hd,
    eps, theta, embed, head and implement w(hf_name) -> float32 weight (HF layout)."""

    def rms(self, x, w):
        var = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)).astype(np.float32) * w

    def rope(self, x):
        # x: [T, heads, hd]
        T, d = x.shape[0], self.hd
        inv = self.theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, axis=-1).astype(np.float32)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, axis=-1).astype(np.float32)[:, None, :]
        rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
        return x * cos + rot * sin

    def forward(self, ids, capture=None):
        T = len(ids)
        x = self.embed[np.array(ids)]
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
        rep = self.n_heads // self.n_kv
        w = self.w
        for l in range(self.n_layers):
            p = "model.layers.%d." % l
            h = self.rms(x, w(p + "input_layernorm.weight"))
            q = (h @ w(p + "self_attn.q_proj.weight").T).reshape(T, self.n_heads, self.hd)
            k = (h @ w(p + "self_attn.k_proj.weight").T).reshape(T, self.n_kv, self.hd)
            v = (h @ w(p + "self_attn.v_proj.weight").T).reshape(T, self.n_kv, self.hd)
            q, k = self.rope(q), self.rope(k)
            if capture is not None:
                capture.append((q.copy(), k.copy(), v.copy()))
            kk = np.repeat(k, rep, axis=1)  # query head h -> kv head h // rep
            vv = np.repeat(v, rep, axis=1)
            scores = np.einsum("thd,shd->hts", q, kk) / np.float32(np.sqrt(self.hd)) + mask
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            att = np.einsum("hts,shd->thd", probs, vv).reshape(T, -1)
            x = x + att @ w(p + "self_attn.o_proj.weight").T
            h = self.rms(x, w(p + "post_attention_layernorm.weight"))
            g = h @ w(p + "mlp.gate_proj.weight").T
            u = h @ w(p + "mlp.up_proj.weight").T
            x = x + ((g / (1 + np.exp(-g))) * u) @ w(p + "mlp.down_proj.weight").T
        x = self.rms(x, w("model.norm.weight"))
        return x @ self.head.T


class Llama(LlamaForward):
    """A Hugging Face folder: config.json + model.safetensors."""

    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.cfg = cfg
        self.t = load_safetensors(os.path.join(model_dir, "model.safetensors"))
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads", self.n_heads)
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.n_heads
        self.eps = cfg["rms_norm_eps"]
        self.theta = cfg.get("rope_theta", 10000.0)
        emb = self.t.get("model.embed_tokens.weight")
        head = self.t.get("lm_head.weight")
        if cfg.get("tie_word_embeddings"):
            emb = emb if emb is not None else head
            head = emb
        self.embed, self.head = emb, head

    def w(self, name):
        return self.t[name]


def floats(a):
    return [float(v) for v in np.asarray(a, dtype=np.float32).ravel()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    args = ap.parse_args()
    with open(args.input, encoding="utf-8") as f:
        req = json.load(f)

    tok = BpeTokenizer(os.path.join(args.model, "tokenizer.json"))
    model = Llama(args.model)
    out = {"encodings": [tok.encode(s) for s in req.get("encode", [])]}

    ids = tok.encode_for_scoring(req["prompt"])[:model.cfg["max_position_embeddings"]]
    out["prompt_ids"] = ids
    cap = []
    logits = model.forward(ids, cap)
    T = len(ids)
    out["logits"] = {str(t): floats(logits[t]) for t in sorted({0, T // 2, T - 1})}
    out["q"] = {str(l): floats(cap[l][0]) for l in range(min(2, len(cap)))}
    out["k"] = {str(l): floats(cap[l][1]) for l in range(min(2, len(cap)))}
    out["v"] = {str(l): floats(cap[l][2]) for l in range(min(2, len(cap)))}

    eos = model.cfg.get("eos_token_id")
    seq = [tok.bos]
    for _ in range(req.get("generate", 0)):
        nxt = int(np.argmax(model.forward(seq)[-1]))
        seq.append(nxt)
        if nxt == eos:
            break
    out["generated"] = seq[1:]
    out["generated_text"] = tok.decode(seq[1:])
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
