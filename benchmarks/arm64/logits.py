"""Logits of an artifact on fixed tokens, in its own runtime on this machine (x86, or the emulated arm64 board).

    python logits.py ARTIFACT OUT.npy

A prefill of PREFILL tokens from an empty cache, then DECODE single-token steps through the KV cache, the tokens
fixed (teacher-forced, so one machine's argmax cannot steer the other's inputs): OUT.npy holds the float32
logits of every position, [PREFILL + DECODE, vocab]. arm64_board.sh runs it on both sides and compares.
"""

import sys

import numpy as np
import torch

from edgeforge.export import open_artifact

PREFILL, DECODE = 16, 32


def main() -> None:
    artifact, out = sys.argv[1], sys.argv[2]
    session = open_artifact(artifact).open()
    tokens = [(7 * i + 3) % 500 + 1 for i in range(PREFILL + DECODE)]  # ids every vocabulary here has
    rows = [session.forward(torch.tensor([tokens[:PREFILL]]), torch.arange(PREFILL))[0]]
    for position in range(PREFILL, PREFILL + DECODE):
        rows.append(session.forward(torch.tensor([[tokens[position]]]), torch.tensor([position]))[0])
    np.save(out, torch.cat(rows).float().numpy())


if __name__ == "__main__":
    main()
