"""Generate with the Python API: load a checkpoint, run the reference engine.

    tilecomp init --preset tiny --out /tmp/tiny
    python examples/generate_api.py /tmp/tiny
"""
import sys

import torch

from tilecomp.models import load_pretrained
from tilecomp.runtime import ReferenceEngine


def main(checkpoint: str):
    target, draft = load_pretrained(checkpoint, dtype=torch.float32, device="cpu")
    engine = ReferenceEngine(target, draft, max_len=256)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]

    def show(tokens):                                     # called once per committed batch
        print("committed", tokens)

    greedy = engine.generate(prompt, max_new_tokens=24, on_tokens=show)
    plain = engine.generate(prompt, max_new_tokens=24, use_draft=False)
    assert greedy.tokens == plain.tokens                  # DFlash never changes greedy output
    print(f"acceptance per step {greedy.acceptance}, mean {greedy.mean_acceptance:.2f} tokens/step, "
          f"{greedy.tokens_per_s:.1f} tokens/s")

    sampled = engine.generate(prompt, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=1)
    print("sampled", sampled.tokens)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny")
