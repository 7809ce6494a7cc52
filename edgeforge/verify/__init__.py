"""Verification: how far a quantized or exported model drifts from the fp32 reference, and how fast it runs.

``drift``: llama.cpp ``llama-perplexity --kl-divergence`` style statistics (KLD, perplexity ratio,
top-1 agreement, delta-p, each with its uncertainty) from paired logits on the same token windows.
``verify``: runs an artifact in its runtime against the cached reference (``reference``), with gates.
``embedding``: cosine and neighbour agreement for sentence encoders.
``bench``: latency, memory and the memory-bandwidth ceiling (``machine``), each model in its own process.
"""
