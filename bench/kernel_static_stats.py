#!/usr/bin/env python
"""Static cost of the Triton kernels on sm_90, without a GPU.

    python bench/kernel_static_stats.py [--module activation] [--dtype fp32] [--arch 90]

Compiles every configuration a kernels/ module lists in ``_compile_specs()`` and prints,
from the cubin (``cuobjdump`` ships with Triton): SASS instructions, CALL instructions
(int64 division and other subroutines), registers per thread, stack bytes (spills) and
shared memory. It cannot give a time, but it shows register pressure that limits
occupancy and per-element work that makes a memory-bound kernel compute-bound.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = ("compaction", "activation", "masks", "_splitk", "gemm_weight_grad",
           "conv_weight_grad", "depthwise_weight_grad")


def _cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def kernel_stats(fn, signature: dict, constexprs: dict, options: dict, arch: int = 90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn, signature, constexprs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    instructions = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]

    def field(name):
        m = re.search(rf"{name}:(\d+)", usage)
        return int(m.group(1)) if m else None

    return {"sass": len(instructions), "calls": sum(" CALL" in line for line in instructions),
            "registers": field("REG"), "stack": field("STACK"),
            "shared": compiled.metadata.shared}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", choices=MODULES, action="append",
                        help="kernels/ module (repeatable; default all)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), action="append",
                        help="element type of the data pointers (repeatable; default all)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_env import ensure_kernels
    _, error = ensure_kernels()
    if error:
        print(f"kernels not importable: {error}", file=sys.stderr)
        return 1
    print("| kernel | dtype | configuration | SASS | CALL | registers | stack B | shared B |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.module or MODULES:
        mod = importlib.import_module(f"trady_triton.kernels.{name}")
        for fn, sig, cst, opts in mod._compile_specs():
            # the data type: x's, else the output's (a workspace may be float32 anyway)
            ptrs = [sig[k] for k in ("x_ptr", "passes_ptr", "out_ptr") if k in sig]
            ptrs += [v for k, v in sig.items() if k.endswith("_ptr")]
            dtype = next((v.lstrip("*") for v in ptrs if v.lstrip("*") in
                          ("fp32", "fp16", "bf16")), "-")
            if args.dtype and dtype not in args.dtype:
                continue
            s = kernel_stats(fn, sig, cst, opts, args.arch)
            config = ", ".join(f"{k}={v}" for k, v in {**cst, **opts}.items())
            print(f"| {fn.__name__} | {dtype} | {config} | {s['sass']} | {s['calls']} | "
                  f"{s['registers']} | {s['stack']} | {s['shared']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
