"""Foreign artifacts (another tool's ONNX, .pte, GGUF, eager model) scored by edgeforge's own verify statistics:
the windows ``edgeforge verify`` cuts from the evaluation text with the reference's tokenizer, the fp32
reference from verify's cache (the one ``edgeforge verify`` fills, so a row pairs with real_checkpoints.py's)
and :func:`edgeforge.verify.decoder.measure_decoder`'s statistics. Used by peer_rows.py.

    evaluation = Evaluation.open(reference_dir, eval_text, seq_len=256, windows=32)
    row = evaluation.score(session, path=artifact, scheme="8da4w", runtime="onnx")

``session`` is anything with the decoder session protocol verify's runtime sessions implement:
``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]`` (each window comes as one prefill from
position 0); or ``runtime="eager"`` with ``window_logits(windows [B, L]) -> [B, L, vocab]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Evaluation:
    """The reference checkpoint, the evaluation documents and the window settings every row shares."""

    reference: object  # the opened fp32 checkpoint
    documents: list
    context: object  # edgeforge.verify.measured.MeasureContext
    options: object  # edgeforge.verify.verify.VerifyOptions

    @classmethod
    def open(cls, reference_dir: Path, data: Path, *, seq_len: int, windows: int) -> Evaluation:
        from edgeforge.checkpoints import open_checkpoint
        from edgeforge.quantize.calibration import read_documents
        from edgeforge.verify.measured import MeasureContext
        from edgeforge.verify.verify import VerifyOptions

        reference = open_checkpoint(reference_dir)
        documents, data_sha256 = read_documents(data)
        context = MeasureContext(data_path=Path(data), data_sha256=data_sha256,
                                 reference_sha256=reference.content_hash())
        return cls(reference, documents, context, VerifyOptions(seq_len=seq_len, windows=windows, eager=False))

    def score(self, session, *, path: Path, scheme: str, runtime: str, max_seq_len: int | None = None,
              lineage=None, say=lambda message: None) -> dict:
        """Drift of ``session`` against the fp32 reference: verify's drift record, per-window KLDs, settings.

        lineage: an edgeforge Lineage when the model was calibrated (for verify's overlap check); None: data-free.
        """
        from edgeforge.fileio import content_sha256
        from edgeforge.verify.decoder import measure_decoder
        from edgeforge.verify.lineage import Lineage
        from edgeforge.verify.models import EvalModel, ModelInfo
        from edgeforge.verify.reference import default_cache_dir

        info = ModelInfo(path=Path(path), kind="peer", format=runtime, architecture="llama", scheme=scheme,
                         max_seq_len=max_seq_len or self.options.seq_len, record=None)
        model = EvalModel(info=info, sha256=content_sha256(path),
                          lineage=lineage or Lineage(source_sha256=self.context.reference_sha256), session=session)
        start = time.perf_counter()
        measured = measure_decoder(model, self.reference, self.documents, self.options, default_cache_dir(), say,
                                   self.context)
        return {"sha256": model.sha256, "drift": vars(measured.drift),
                "window_kld_mean_nats": measured.samples.window_kld_mean_nats, "overlap": vars(measured.overlap),
                "tokens_sha256": measured.tokens_sha256, "settings": vars(measured.settings),
                "reference_cache": vars(measured.cache), "seconds": round(time.perf_counter() - start, 1)}
