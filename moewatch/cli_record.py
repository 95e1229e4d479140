"""``moewatch baseline record MODEL_DIR DATA... -o baseline.json`` (registered by ``cli_baseline``)."""
from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2  # a model directory, tokenizer or data that cannot be used; too little data
EXIT_FAILED = 1  # recording ran but the baseline could not be built or written


def add_parser(subparsers) -> None:
    from .record import MAX_WINDOW_TOKENS, MIN_WINDOW_TOKENS, TARGET_WINDOWS

    record = subparsers.add_parser(
        "record", help="record a baseline by running text through a local transformers model",
        description="Run text through a local transformers MoE model with moewatch attached and save the "
                    "baseline of its routing. The traffic is planned before the model runs: how many "
                    "tokens, how many windows; too little for a baseline is an error then. Ends with the "
                    "baseline's summary.")
    record.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a local model directory (config.json and weights, as save_pretrained writes)")
    record.add_argument("data", metavar="DATA", nargs="+",
                        help="text files (each one document) or .jsonl files (one document per line: a JSON "
                             "string, or an object with a --text-key field)")
    record.add_argument("-o", "--output", required=True, help="baseline JSON file to write")
    record.add_argument("--tokenizer", metavar="DIR|bytes", default=None,
                        help="where the tokenizer is (default: MODEL_DIR); 'bytes' for byte-level models "
                             "whose token ids are the UTF-8 bytes of the text")
    record.add_argument("--text-key", default="text", help="the text field of JSONL objects (default: text)")
    record.add_argument("--window-tokens", type=int, default=None,
                        help=f"tokens per baseline window (default: the data split into {TARGET_WINDOWS} "
                             f"windows, {MIN_WINDOW_TOKENS} to {MAX_WINDOW_TOKENS} tokens each)")
    record.add_argument("--seq-len", type=int, default=512,
                        help="tokens per sequence (default 512, at most the model's positions)")
    record.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    record.add_argument("--device", default="cpu", help="torch device to run the model on (default: cpu)")
    record.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (default: as saved)")
    record.add_argument("--model-name", default=None,
                        help="the model name recorded in the baseline (default: MODEL_DIR, as attach names it)")
    record.add_argument("--no-progress", action="store_true", help="no progress bar")
    record.set_defaults(func=_record)


def _record(args: argparse.Namespace) -> int:
    from .baseline import BaselineError
    from .cli_baseline import print_summary
    from .record import RecordError, record_baseline

    for name in ("window_tokens", "seq_len", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"moewatch baseline record: --{name.replace('_', '-')} must be a positive number",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        baseline = record_baseline(args.model_dir, args.data, tokenizer=args.tokenizer, text_key=args.text_key,
                                   seq_len=args.seq_len, batch_size=args.batch_size,
                                   window_tokens=args.window_tokens, device=args.device, dtype=args.dtype,
                                   model_name=args.model_name, progress=not args.no_progress)
    except RecordError as error:
        print(f"moewatch baseline record: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BaselineError, OSError) as error:
        print(f"moewatch baseline record: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        baseline.save(args.output)
    except OSError as error:
        print(f"moewatch baseline record: could not write {args.output}: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {args.output}")
    print_summary(baseline)
    return 0
