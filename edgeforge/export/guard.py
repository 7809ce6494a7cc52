"""The miscompile guard: run the new artifact on fixed sequences and compare it with the eager model.

The eager (quantized) model is what edgeforge quantized; the artifact must compute the same thing
within the scheme's tolerance. Prefill of a fixed prompt, then single-token decode steps, both
through each side's KV cache, so the decode graph is checked too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgeforge.errors import GateFailed

# Minimum cosine between artifact and eager logits at any position, and top-1 agreement, per scheme.
# fp32 differs only by kernel summation order. With int8 activations a last-bit difference in a fused
# kernel can push a value across a rounding boundary; the flipped key/value then stays in the KV cache,
# so near-tied top tokens flip at a few positions. A miscompile is far outside both (cosine ~0.004).
TOLERANCE = {"fp32": (0.99999, 1.0), "default": (0.999, 0.90)}
# Top-1 agreement counts a position where the artifact's top token is the eager top token, or one the eager
# model finds as likely to within this many nats: a tie is not a disagreement (random-weight models are full
# of near-ties: their next-token distributions are almost flat).
NEAR_TIE_NATS = 0.01
SUGGESTION = {"8w": "8da8w (recipe int8-dynamic) or 8da4w (recipe int4-gptq)"}


@dataclass(frozen=True)
class GuardReport:
    positions: int
    min_cosine: float
    max_abs_diff: float
    top1_agreement: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def fixed_sequence(vocab_size: int, length: int, seed: int = 1234) -> torch.Tensor:
    """The guard's token ids [1, length]: deterministic, starting with BOS-like id 1."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab_size, (1, length), generator=generator)
    tokens[0, 0] = 1 if vocab_size > 1 else 0
    return tokens


@torch.no_grad()
def decode_logits(forward, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [length, vocab] from ``forward(tokens, input_pos)``: one prefill call, then one token per call."""
    outputs = [forward(tokens[:, :prefill], torch.arange(prefill))[0]]
    for position in range(prefill, tokens.shape[1]):
        outputs.append(forward(tokens[:, position:position + 1], torch.tensor([position]))[0])
    return torch.cat(outputs).float()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, scheme: str,
                   tolerance: tuple[float, float] | None = None) -> GuardReport:
    """``tolerance`` (min cosine, min top-1) replaces the scheme's default; an exporter whose runtime
    computes a scheme differently by design (see its report's ``guard_tolerance``) passes one."""
    cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    min_cosine, min_top1 = tolerance or TOLERANCE.get(scheme, TOLERANCE["default"])
    log_probs = reference.double().log_softmax(-1)
    chosen = log_probs.gather(-1, candidate.argmax(-1, keepdim=True)).squeeze(-1)
    top1 = (chosen >= log_probs.max(-1).values - NEAR_TIE_NATS).float().mean().item()
    report = GuardReport(positions=reference.shape[0], min_cosine=cosine.min().item(),
                         max_abs_diff=(reference - candidate).abs().max().item(), top1_agreement=top1,
                         passed=bool(cosine.min().item() >= min_cosine and top1 >= min_top1))
    return report


def check_decoder(session, eager_model, *, scheme: str, max_seq_len: int, prefill: int = 64, decode: int = 32,
                  layer_scheme: str = "", tolerance: tuple[float, float] | None = None) -> GuardReport:
    """Compare a decoder artifact with the eager model; raise GateFailed if it is outside tolerance."""
    prefill = min(prefill, max_seq_len // 2)
    length = min(prefill + decode, max_seq_len)
    tokens = fixed_sequence(eager_model.config.vocab_size, length)
    eager_model.setup_cache(1, max_seq_len)
    reference = decode_logits(eager_model, tokens, prefill)
    candidate = decode_logits(session.forward, tokens, prefill)
    report = compare_logits(reference, candidate, scheme, tolerance)
    if not report.passed:
        hint = SUGGESTION.get(scheme, "fp32, or another scheme the target lists")
        raise GateFailed(f"export guard: the artifact's logits disagree with the eager {scheme} model "
                         f"(min cosine {report.min_cosine:.4f}, top-1 agreement {report.top1_agreement:.3f} over "
                         f"{report.positions} positions{layer_scheme}); the lowering of this scheme is wrong here. "
                         f"Try {hint}")
    return report


GUARD_SENTENCES = ("A man is eating food.", "The quick brown fox jumps over the lazy dog.",
                   "Quantized models must be checked against their reference.", "Hello")


@torch.no_grad()
def check_encoder(session, eager_model, tokenizer, *, scheme: str,
                  tolerance: tuple[float, float] | None = None) -> GuardReport:
    """Compare a sentence-embedding artifact with the eager encoder on fixed sentences."""
    inputs = tokenizer.encode_batch(list(GUARD_SENTENCES), max_length=eager_model.config.max_seq_len)
    reference = eager_model(*inputs).float()
    candidate = session.embed(*inputs).float()
    report = compare_logits(reference, candidate, scheme, tolerance)
    report = GuardReport(report.positions, report.min_cosine, report.max_abs_diff, 1.0,
                         report.min_cosine >= (tolerance or TOLERANCE.get(scheme, TOLERANCE["default"]))[0])
    if not report.passed:
        raise GateFailed(f"export guard: the artifact's embeddings disagree with the eager {scheme} encoder "
                         f"(min cosine {report.min_cosine:.5f} over {report.positions} sentences)")
    return report
