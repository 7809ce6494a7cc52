"""Verification: how far a quantized or exported model drifts from the fp32 reference, and how fast it runs.

``drift``: llama.cpp ``llama-perplexity --kl-divergence`` style statistics (KLD, perplexity ratio,
top-1 agreement, delta-p, each with its uncertainty) from paired logits on the same token windows.
``verify``: runs an artifact in its runtime against the cached reference (``reference``), with gates.
``embedding``: cosine and neighbour agreement for sentence encoders.
``decoder``: the decoder measurement (windows, KLD, the eager source's bound); ``measured``: what each
measurement hands back, and the calibration-overlap check.
``models``: the one model opener (artifact, quantized or plain checkpoint) behind the session protocol.
``bench``: latency, memory and the memory-bandwidth ceiling (``machine``) on a runner's device
(:mod:`edgeforge.runners`; ``local``: each model in its own process).
"""
