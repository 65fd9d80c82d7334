"""`airobackend kernels`: which fast kernels this CPU gets, and `--dump DIR` to read the generated source."""
from __future__ import annotations

import argparse

from ..kernels.ggml_types import GGMLType


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dump", metavar="DIR", default=None,
                        help="write the generated kernel source of every type (one fast_<type>.py each) into DIR; "
                             "AIRO_SIMD=avx2 gives the AVX2 build's")


def main(args: argparse.Namespace) -> int:
    # the kernel modules bring Numba and probe the CPU: here, so that the CLI's other commands start without them
    from ..kernels import codegen
    from ..kernels.specs import ISA, supported_types

    types = ", ".join(GGMLType(t).name for t in supported_types()) or "none (the float32 kernels are used)"
    print(f"instruction set: {ISA}; fast kernels: {types}")
    if args.dump is not None:
        if ISA == "none":
            print("nothing to dump: no fast kernels on this CPU (or AIRO_SIMD=none)")
            return 1
        for path in codegen.dump(args.dump):
            print(path)
    return 0
