"""Batched beam search over an abstract step function (knows nothing of Keras models or files).

`beam_search` is im2txt's algorithm batched over images; `greedy_search` (its beam-1 fast path),
`sample_search` (temperature / top-k under a seed), and `generate` + `SearchConfig` (pick one by settings).
"""

from beam.common import LOG_MIN_PROB, Caption, apply_bans, top_k
from beam.config import SearchConfig, generate
from beam.sampling import greedy_search, sample_search
from beam.search import beam_search

__all__ = ["LOG_MIN_PROB", "Caption", "SearchConfig", "apply_bans", "beam_search", "generate",
           "greedy_search", "sample_search", "top_k"]
