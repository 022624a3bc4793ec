"""What general-purpose compressors make of the built-in corpus's held-out split, in bits
per byte: the figure a language model trained on the built-in training split should beat.

Each compressor is given the training split as a dictionary: the held-out text costs
``compressed(train + held-out) - compressed(train)`` bytes, so it is charged only for
what the training text does not already predict, as the model is. Documents are joined
by a newline (a document's end costs the compressor what its EOS costs the model); the
bytes divided by are the documents' UTF-8 text, the bytes t2x's evaluation counts.

    python benchmarks/compressor.py            # xz -9e (LZMA2 preset 9, extreme), bzip2 -9, gzip -9

Prints one JSON line per compressor.
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
import zlib

from t2x.data.corpus import split_file

COMPRESSORS = {
    "xz -9e": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
    "bzip2 -9": lambda data: bz2.compress(data, 9),
    "gzip -9": lambda data: zlib.compress(data, 9),
}


def documents(split: str) -> list[str]:
    with open(split_file(split), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def held_out_bits_per_byte(compress, train: bytes, held_out: bytes, held_out_text_bytes: int) -> float:
    extra = len(compress(train + held_out)) - len(compress(train))
    return 8 * extra / held_out_text_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(COMPRESSORS), help="compressors to run (default: all)")
    args = parser.parse_args(argv)
    train, held_out = documents("train"), documents("validation")
    train_bytes = ("\n".join(train) + "\n").encode()
    held_bytes = ("\n".join(held_out) + "\n").encode()
    text_bytes = sum(len(d.encode()) for d in held_out)
    for name in args.only or COMPRESSORS:
        bpb = held_out_bits_per_byte(COMPRESSORS[name], train_bytes, held_bytes, text_bytes)
        print(json.dumps({"compressor": name, "held_out_bits_per_byte": round(bpb, 4),
                          "held_out_documents": len(held_out), "held_out_bytes": text_bytes,
                          "train_bytes": len(train_bytes), "alone_bits_per_byte":
                          round(8 * len(COMPRESSORS[name](held_bytes)) / text_bytes, 4)}), flush=True)


if __name__ == "__main__":
    main()
