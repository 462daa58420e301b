"""``python -m benchmarks.detokenizer``: CPU per token of the old detokenizer against the new.

Old: ``StreamDetokenizer`` (the Python window algorithm the tokenizer service runs for
DetokenizeStream, gRPC not included). New: ``FastDetokenizer`` (DecodeStream, Rust), which the
router runs in-process. Both decode the same ids, one token per ``add`` (a worker message per
engine step) and in chunks, with and without stop strings; each case is the least CPU time
(``time.process_time``) of a few rounds in which old and new take turns, in this one process.
The ratio is what to read: machines here are noisy.

    python -m benchmarks.detokenizer                 # the default model's tokenizer
    python -m benchmarks.detokenizer --model DIR --tokens 20000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import tokenizers

from pdmesh.tokenizer import StreamDetokenizer, Tokenizer
from pdmesh.tokenizer.fast_detokenizer import FastDetokenizer

# prose plus characters that byte-level BPE splits over several tokens
SAMPLE = (
    "The router streams each worker's tokens back as text. Emoji 👋🎉 and CJK 世界 日本語 "
    "split across byte tokens; naïve café — done. "
)
STOPS = ("<|im_end|>", "\n\nUser:")

Run = Callable[[Sequence[Sequence[int]]], str]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detokenizer", description=__doc__)
    parser.add_argument("--model", default="", help="a HF dir (default: the default model)")
    parser.add_argument("--tokens", type=int, default=10000, help="ids decoded per case")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per case; the best counts")
    args = parser.parse_args(argv)
    model_dir = Path(args.model) if args.model else _default_model()
    old_tok = Tokenizer.from_dir(model_dir)
    backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = backend.encode(SAMPLE * (args.tokens // 30 + 1)).ids[: args.tokens]
    prompt = backend.encode("Tell me a story.").ids

    print(f"{model_dir.name}: {len(ids)} ids per case, best of {args.repeats}")
    print(f"{'case':<28}{'old µs/tok':>12}{'new µs/tok':>12}{'old/new':>9}")
    for stop in ((), STOPS):
        for chunk in (1, 8):
            chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]

            def old(chunks: Sequence[Sequence[int]], stop: Sequence[str] = stop) -> str:
                d = StreamDetokenizer(old_tok, True, stop, prompt)
                return "".join(d.add(c, i == len(chunks) - 1).text for i, c in enumerate(chunks))

            def new(chunks: Sequence[Sequence[int]], stop: Sequence[str] = stop) -> str:
                d = FastDetokenizer(backend, True, stop, prompt)
                return "".join(d.add(c, i == len(chunks) - 1).text for i, c in enumerate(chunks))

            assert old(chunks) == new(chunks), "the detokenizers disagree"
            t_old, t_new = (t / len(ids) * 1e6 for t in _best((old, new), chunks, args.repeats))
            case = f"{chunk} id/add, {'stops' if stop else 'no stops'}"
            print(f"{case:<28}{t_old:>12.2f}{t_new:>12.2f}{t_old / t_new:>8.1f}x")
    return 0


def _best(runs: Sequence[Run], chunks: Sequence[Sequence[int]], repeats: int) -> list[float]:
    """The least CPU seconds of each run over ``repeats`` rounds; the runs take turns within a
    round, so a busy spell of the machine hits both alike."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.process_time()
            run(chunks)
            best[i] = min(best[i], time.process_time() - start)
    return best


def _default_model() -> Path:
    from pdmesh.models.fetch import ensure_default_model

    return Path(ensure_default_model(progress=False))


if __name__ == "__main__":
    raise SystemExit(main())
