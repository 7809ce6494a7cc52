"""Verification: how far a quantized or exported model drifts from the fp32 reference.

``drift`` holds llama.cpp ``llama-perplexity --kl-divergence`` style statistics (KLD, perplexity
ratio, top-1 agreement, delta-p, each with its uncertainty) computed from paired logits on the same
token windows. The reference cache, latency runner and bandwidth ceiling come later.
"""
