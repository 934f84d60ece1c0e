"""What `caption` prints for each image (decoder.infer.caption_run.print_captions): the top captions numbered
from 0 with p = exp(logprob) on stdout, a skipped image's reason on stderr, every key on one line."""

import math

from beam import Caption
from decoder.infer.caption_run import print_captions
from decoder.infer.captioner import CaptionRun, ImageCaptions


def test_top_captions_with_probabilities_and_skipped_images_on_one_line():
    captions = [Caption([1, 5, 2], math.log(0.5), math.log(0.5)), Caption([1, 6, 2], math.log(0.25), 0.0),
                Caption([1, 7, 2], math.log(0.125), 0.0)]
    run = CaptionRun([ImageCaptions("a\nb.jpg", -1, captions, ["a dog", "a cat", "a cow"]),
                      ImageCaptions("bad\tname.jpg", -1, error="not-an-image: cannot identify image file")],
                     seconds=1.0)
    out, err = [], []
    print_captions(run, top=2, echo=out.append, log=err.append)
    assert out == ["Captions for image a\\nb.jpg:", "  0) a dog (p=0.500000)", "  1) a cat (p=0.250000)"]
    assert err == ["Skipped bad\\tname.jpg: not-an-image: cannot identify image file"]
