"""The caption-generation settings (one dataclass) and `generate`, which runs the search they select."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from beam.common import Caption
from beam.sampling import sample_search
from beam.search import beam_search


@dataclass
class SearchConfig:
    """How captions are generated. The defaults are im2txt's (beam 3, max length 20, no normalisation)."""

    beam_size: int = 3  # partial captions kept per image and words tried per partial; 1 = greedy
    max_length: int = 20  # most tokens in a caption, counting <S> (and </S>); im2txt: 20
    length_normalization: float = 0.0  # alpha: complete captions scored logprob / len**alpha; im2txt: 0
    no_repeat_ngram: int = 0  # n > 0: never repeat an n-gram within a caption (0 = off, im2txt)
    suppress_unk: bool = False  # never emit <UNK> (needs the vocabulary's unk id)
    sample: bool = False  # draw captions at random instead of beam search
    num_samples: int = 1  # sampling: captions drawn per image
    temperature: float = 1.0  # sampling: softmax temperature (> 0; < 1 sharper, > 1 flatter)
    top_k: int = 0  # sampling: draw only among each step's k most likely words (0 = all words)
    seed: int = 0  # sampling: seed of the random stream

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        """Inverse of to_dict; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def generate(initial_state, step_fn, config: SearchConfig, *, start_id: int, end_id: int,
             unk_id: int | None = None) -> list[list[Caption]]:
    """Captions for B images with the search `config` selects (beam, greedy when beam_size is 1, or sampling).

    initial_state / step_fn as in beam.beam_search. Returns per image a list of Captions, best first.
    """
    common = dict(start_id=start_id, end_id=end_id, max_length=config.max_length,
                  length_normalization=config.length_normalization, no_repeat_ngram=config.no_repeat_ngram,
                  suppress_unk=config.suppress_unk, unk_id=unk_id)
    if config.sample:
        return sample_search(initial_state, step_fn, num_samples=config.num_samples,
                             temperature=config.temperature, top_k_words=config.top_k, seed=config.seed,
                             **common)
    return beam_search(initial_state, step_fn, beam_size=config.beam_size, **common)
