#!/usr/bin/env python3
"""Simulation (CPU, numpy) of how often encode variants 15 and 16 skip the exact rescore.

The fraction of rows whose two candidates (the best score and the best of the other seven lane
classes, col % 8) are decided by ScoresDecide's error bound (kernels/cuda/rvq_encode_sm90.cu) on
data like gpu_bench's: LLaMA-geometry keys, 56 stages x 1024 codewords, random codebooks of scale
1.6 * 0.9^stage, inputs N(0, 1) plus a per-channel offset 2 * N(0, 1); greedy RVQ with exact
float32 scores. An estimate of the skip rate, not a GPU measurement.
Usage: /usr/bin/python3 bench/gpu/rescore_skip_sim.py
"""
import numpy as np
rng=np.random.default_rng(7)
D=128; N=1024; R=2048; S=56
off=2*rng.standard_normal(D).astype(np.float32)
r=(rng.standard_normal((R,D)).astype(np.float32)+off)
cls=np.arange(N)%8
rho=N*2.0**-23; k=rho+2.0**-12
fr=[]; bt=[]
for st in range(S):
    c=(1.6*0.9**st*(rng.uniform(size=(N,D,4)).sum(-1)-2)*np.sqrt(3)).astype(np.float32)
    m=np.abs(c).max(); e=int(np.frexp(m)[1]); sc=2.0**-e
    n=(c.astype(np.float64)**2).sum(1)
    Sx=(sc*sc)*(r@c.T-0.5*n[None,:])
    j1=Sx.argmax(1); s1=Sx[np.arange(R),j1]
    S2=Sx.copy(); S2[cls[None,:]==cls[j1][:,None]]=-np.inf
    j2=S2.argmax(1); s2=S2[np.arange(R),j2]
    na=sc*np.linalg.norm(r,axis=1); nb1=sc*np.sqrt(n[j1]); nb2=sc*np.sqrt(n[j2])
    t1=na*nb1+0.5*nb1**2; t2=na*nb2+0.5*nb2**2
    e_=(2**-10+2**-20)*na*(nb1+nb2)+k*(t1+t2)+2**-24*np.sqrt(D)*(2*na+nb1+nb2+2)
    dec=(s1-s2)>e_*(1+2**-10)
    fr.append(dec.mean()); bt.append(dec.reshape(-1,4).all(1).mean())
    r=r-c[j1]
print("rows decided per stage (min/mean/max): %.3f %.3f %.3f"%(min(fr),np.mean(fr),max(fr)))
print("batches of 4 decided (mean): %.3f"%np.mean(bt))
print("stages 0,10,30,55:", [round(float(fr[i]),3) for i in (0,10,30,55)])
